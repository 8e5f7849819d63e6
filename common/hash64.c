/*
 * hash64.c - FNV-1a and the splitmix64 finalizer for the gateway's address tables and router
 * and the deliverer's hash tables (contract: hash64.h). Frozen: the router's placement of
 * users depends on both.
 */
#include "hash64.h"

uint64_t hash64_fnv1a(const char *s, int fold, size_t *len)
{
    uint64_t h = 0xcbf29ce484222325ull;
    size_t i;

    for (i = 0; s[i] != '\0'; i++) {
        unsigned char c = (unsigned char)s[i];

        if (fold && c >= 'A' && c <= 'Z')
            c = (unsigned char)(c - 'A' + 'a');
        h ^= c;
        h *= 0x100000001b3ull;
    }
    if (len)
        *len = i;
    return h;
}

uint64_t hash64_mix(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}
