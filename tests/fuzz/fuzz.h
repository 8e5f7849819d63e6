/*
 * fuzz.h - what every libFuzzer harness in tests/fuzz shares: the entry point's prototype, a
 * check that turns a broken invariant into a crash libFuzzer records, and a tiny PRNG that
 * picks split points from the input itself (so a crash replays exactly from its file).
 */
#ifndef SLUICE_FUZZ_H
#define SLUICE_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A broken invariant is a finding like a crash: say which, then abort for the artifact. */
#define FUZZ_CHECK(cond)                                                                     \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond);      \
            abort();                                                                         \
        }                                                                                    \
    } while (0)

/* xorshift32; a zero seed would stay zero. */
static inline uint32_t fuzz_rand(uint32_t *s)
{
    uint32_t x = *s ? *s : 0x9E3779B9u;

    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *s = x;
    return x;
}

#endif
