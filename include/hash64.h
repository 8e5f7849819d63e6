/*
 * hash64.h - the 64-bit hashes sluice's tables share: FNV-1a (ASCII folded to lower case on
 * request) and splitmix64's finalizer. The gateway's router places users with both, so they
 * are frozen: changing either moves users between mailstores (test_router pins it). The
 * deliverer's hash tables (the reseller API's rate buckets) use the same FNV-1a.
 */
#ifndef SLUICE_HASH64_H
#define SLUICE_HASH64_H

#include <stddef.h>
#include <stdint.h>

/* 64-bit FNV-1a of the string s, with A-Z taken as a-z when fold is set; its length into *len
 * when len is not NULL. */
uint64_t hash64_fnv1a(const char *s, int fold, size_t *len);
/* splitmix64's finalizer: a bijection in which every input bit flips about half the output
 * (FNV alone leaves the low bits poorly mixed for keys that differ only at the end). */
uint64_t hash64_mix(uint64_t x);

#endif
