/*
 * api_rate.h - the reseller API's rate limit: a token bucket per key (the tenant a token
 * belongs to), refilled at rate per second up to burst. A request that finds its bucket
 * empty gets 429 with Retry-After: the seconds until a token is back.
 *
 * Thread-safe (one mutex; a take is a hash lookup and some arithmetic). Keys are remembered
 * for the life of the limiter: at most one per tenant ever configured.
 */
#ifndef SLUICE_API_RATE_H
#define SLUICE_API_RATE_H

#include <stdint.h>

struct api_rate;

/* NULL when out of memory. */
struct api_rate *api_rate_new(double rate, double burst);
void api_rate_free(struct api_rate *r);
/* New limits (SIGHUP); buckets keep their tokens, capped at the new burst. */
void api_rate_set(struct api_rate *r, double rate, double burst);
/* Take a token for key at now_ms (a monotonic clock): 0 when the request may go on, else the
 * whole seconds (>= 1) to wait. A key seen for the first time starts with a full bucket. */
int api_rate_take(struct api_rate *r, const char *key, int64_t now_ms);

#endif
