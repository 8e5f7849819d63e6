/*
 * crc32c.h - CRC32C (Castagnoli), the checksum of spool records: SSE4.2 when the CPU has it,
 * a portable slicing-by-8 loop otherwise. Both give the same values.
 */
#ifndef SLUICE_CRC32C_H
#define SLUICE_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Extend crc over buf. Start with 0: crc32c(0, "123456789", 9) == 0xE3069283, and
 * crc32c(crc32c(0, a, n), b, m) equals the CRC of a followed by b. Thread-safe. */
uint32_t crc32c(uint32_t crc, const void *buf, size_t len);
/* The software path alone, for tests and benchmarks. */
uint32_t crc32c_sw(uint32_t crc, const void *buf, size_t len);
/* 1 if crc32c() uses the CPU's crc32 instruction. */
int crc32c_hw_enabled(void);

#endif
