/*
 * byteorder.h - fixed-width integers to and from octets, named for their order: the milter
 * protocol is big-endian (network order), the spool's record headers little-endian. One copy,
 * so the two orders cannot be mistaken for each other under a shared name.
 */
#ifndef SLUICE_BYTEORDER_H
#define SLUICE_BYTEORDER_H

#include <stdint.h>

static inline uint32_t be32_get(const void *p)
{
    const unsigned char *u = p;

    return (uint32_t)u[0] << 24 | (uint32_t)u[1] << 16 | (uint32_t)u[2] << 8 | u[3];
}

static inline void be32_put(void *p, uint32_t v)
{
    unsigned char *u = p;

    u[0] = (unsigned char)(v >> 24);
    u[1] = (unsigned char)(v >> 16);
    u[2] = (unsigned char)(v >> 8);
    u[3] = (unsigned char)v;
}

static inline uint16_t le16_get(const void *p)
{
    const unsigned char *u = p;

    return (uint16_t)(u[0] | u[1] << 8);
}

static inline void le16_put(void *p, uint16_t v)
{
    unsigned char *u = p;

    u[0] = (unsigned char)v;
    u[1] = (unsigned char)(v >> 8);
}

static inline uint32_t le32_get(const void *p)
{
    const unsigned char *u = p;

    return (uint32_t)u[0] | (uint32_t)u[1] << 8 | (uint32_t)u[2] << 16 | (uint32_t)u[3] << 24;
}

static inline void le32_put(void *p, uint32_t v)
{
    unsigned char *u = p;

    for (int i = 0; i < 4; i++)
        u[i] = (unsigned char)(v >> (8 * i));
}

static inline uint64_t le64_get(const void *p)
{
    const unsigned char *u = p;

    return (uint64_t)le32_get(u) | (uint64_t)le32_get(u + 4) << 32;
}

static inline void le64_put(void *p, uint64_t v)
{
    unsigned char *u = p;

    for (int i = 0; i < 8; i++)
        u[i] = (unsigned char)(v >> (8 * i));
}

#endif
