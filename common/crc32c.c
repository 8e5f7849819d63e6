/*
 * crc32c.c - CRC32C for spool records. The hardware path uses SSE4.2 crc32q, chosen at run
 * time so one binary runs on any x86-64; the fallback is slicing-by-8 over tables built once.
 */
#include "crc32c.h"

#include <pthread.h>
#include <string.h>

#if defined(__x86_64__)
#include <nmmintrin.h>
#define CRC32C_HAVE_X86 1
#endif

#define CRC32C_POLY 0x82F63B78u /* 0x1EDC6F41 bit-reversed */

static void crc32c_init(void);
#ifdef CRC32C_HAVE_X86
static uint32_t crc32c_hw(uint32_t crc, const void *buf, size_t len);
#endif

static uint32_t crc32c_table[8][256];
static uint32_t (*crc32c_impl)(uint32_t, const void *, size_t);
static pthread_once_t crc32c_once = PTHREAD_ONCE_INIT;

static void crc32c_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ CRC32C_POLY : c >> 1;
        crc32c_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc32c_table[t][i] = (crc32c_table[t - 1][i] >> 8) ^
                                 crc32c_table[0][crc32c_table[t - 1][i] & 0xff];
    crc32c_impl = crc32c_sw;
#ifdef CRC32C_HAVE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2"))
        crc32c_impl = crc32c_hw;
#endif
}

/* Slicing-by-8 (Intel, 2006): eight table lookups per 8 bytes instead of eight dependent
 * shifts; little-endian loads, which is every machine sluice targets. */
uint32_t crc32c_sw(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = buf;

    pthread_once(&crc32c_once, crc32c_init);
    crc = ~crc;
    while (len > 0 && ((uintptr_t)p & 7) != 0) {
        crc = crc32c_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        len--;
    }
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc;
        crc = crc32c_table[7][w & 0xff] ^ crc32c_table[6][(w >> 8) & 0xff] ^
              crc32c_table[5][(w >> 16) & 0xff] ^ crc32c_table[4][(w >> 24) & 0xff] ^
              crc32c_table[3][(w >> 32) & 0xff] ^ crc32c_table[2][(w >> 40) & 0xff] ^
              crc32c_table[1][(w >> 48) & 0xff] ^ crc32c_table[0][w >> 56];
        p += 8;
        len -= 8;
    }
    while (len > 0) {
        crc = crc32c_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        len--;
    }
    return ~crc;
}

#ifdef CRC32C_HAVE_X86
__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = buf;
    uint64_t c = ~crc;

    while (len > 0 && ((uintptr_t)p & 7) != 0) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        len--;
    }
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
        p += 8;
        len -= 8;
    }
    while (len > 0) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        len--;
    }
    return ~(uint32_t)c;
}
#endif

uint32_t crc32c(uint32_t crc, const void *buf, size_t len)
{
    pthread_once(&crc32c_once, crc32c_init);
    return crc32c_impl(crc, buf, len);
}

int crc32c_hw_enabled(void)
{
    pthread_once(&crc32c_once, crc32c_init);
    return crc32c_impl != crc32c_sw;
}
