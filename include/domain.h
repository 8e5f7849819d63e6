/*
 * domain.h - one spelling per domain name, so that "is this address in a domain the reseller
 * owns?" is a string comparison (the reseller API's isolation rests on it: docs/resellers.md).
 *
 * The normal form is what DNS looks up: ASCII lower case, no trailing dot, every
 * internationalised label as its A-label ("bücher.example" and "XN--BCHER-KVA.example." are
 * both "xn--bcher-kva.example"). Conversion follows IDNA2008 with the UTS #46 mapping
 * (libidn2, as browsers do), so upper case and NFC variants of a U-label meet as well.
 *
 * Two strengths: domain_norm checks a name a person typed (tenants file, API path, sluicectl)
 * and refuses anything that is not a host name; domain_key only folds what a recipient
 * address in the spool holds, and never fails on ASCII: an address literal or a name with
 * odd characters keeps its own key, which can never equal a checked name. Pure functions,
 * thread-safe.
 */
#ifndef SLUICE_DOMAIN_H
#define SLUICE_DOMAIN_H

#include <stddef.h>

#define DOMAIN_MAX 256          /* 253 octets (RFC 1035) + NUL, rounded up */
#define DOMAIN_LABEL_MAX 63

/* Normalise a host name (LDH labels or U-labels; one trailing dot allowed) into out: 0, or
 * -EINVAL (not a host name: empty label, bad character, a label starting or ending with '-',
 * an "xn--" label that does not decode, a single label) or -ENAMETOOLONG. */
int domain_norm(const char *in, char *out, size_t outlen);
/* The comparison key of an address's domain (after its last '@'): ASCII lower case, one
 * trailing dot dropped, non-ASCII names converted as domain_norm does. 0, or -EINVAL (no '@',
 * an empty domain, a non-ASCII name that does not convert) or -ENAMETOOLONG. */
int domain_key_of_addr(const char *addr, char *out, size_t outlen);
/* The address as one key: the local part with ASCII folded to lower case (as sluicectl
 * affected always did), '@', then domain_key_of_addr. Without a usable domain, the whole
 * address in ASCII lower case. 0 or -ENAMETOOLONG. */
int domain_addr_key(const char *addr, char *out, size_t outlen);
/* For people: the name with its A-labels shown as U-labels when they decode, else as is. */
void domain_display(const char *norm, char *out, size_t outlen);

#endif
