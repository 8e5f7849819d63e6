/*
 * api_rate.c - token buckets by key (contract: api_rate.h): an open-addressing table of
 * buckets, doubled when half full, under one mutex.
 */
#include "api_rate.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "hash64.h"

#define API_RATE_KEY_MAX 64     /* = TENANT_NAME_MAX */

struct bucket {
    char key[API_RATE_KEY_MAX]; /* "" = free slot */
    double tokens;
    int64_t at;                 /* ms of the last refill */
};

struct api_rate {
    pthread_mutex_t mu;
    double rate, burst;
    struct bucket *b;
    size_t cap, used;
};

struct api_rate *api_rate_new(double rate, double burst)
{
    struct api_rate *r = calloc(1, sizeof(*r));

    if (!r || !(r->b = calloc(64, sizeof(*r->b)))) {
        free(r);
        return NULL;
    }
    r->cap = 64;
    pthread_mutex_init(&r->mu, NULL);
    api_rate_set(r, rate, burst);
    return r;
}

void api_rate_free(struct api_rate *r)
{
    if (!r)
        return;
    pthread_mutex_destroy(&r->mu);
    free(r->b);
    free(r);
}

void api_rate_set(struct api_rate *r, double rate, double burst)
{
    pthread_mutex_lock(&r->mu);
    r->rate = rate > 0 ? rate : 1;
    r->burst = burst >= 1 ? burst : 1;
    for (size_t i = 0; i < r->cap; i++)
        if (r->b[i].key[0] && r->b[i].tokens > r->burst)
            r->b[i].tokens = r->burst;
    pthread_mutex_unlock(&r->mu);
}

/* slot - the bucket of key (new ones are not yet filled in: key[0] == 0). */
static struct bucket *slot(struct bucket *b, size_t cap, const char *key)
{
    size_t i = (size_t)hash64_fnv1a(key, 0, NULL) & (cap - 1);

    while (b[i].key[0] && strcmp(b[i].key, key) != 0)
        i = (i + 1) & (cap - 1);
    return &b[i];
}

static int grow(struct api_rate *r)
{
    size_t cap = r->cap * 2;
    struct bucket *nb = calloc(cap, sizeof(*nb));

    if (!nb)
        return -1;
    for (size_t i = 0; i < r->cap; i++)
        if (r->b[i].key[0])
            *slot(nb, cap, r->b[i].key) = r->b[i];
    free(r->b);
    r->b = nb;
    r->cap = cap;
    return 0;
}

int api_rate_take(struct api_rate *r, const char *key, int64_t now_ms)
{
    struct bucket *b;
    int wait = 0;

    if (strlen(key) >= API_RATE_KEY_MAX)
        return 1;
    pthread_mutex_lock(&r->mu);
    if ((r->used + 1) * 2 > r->cap && grow(r) < 0) {
        pthread_mutex_unlock(&r->mu);
        return 1;               /* out of memory: make them wait rather than fail open */
    }
    b = slot(r->b, r->cap, key);
    if (!b->key[0]) {
        strcpy(b->key, key);
        b->tokens = r->burst;
        b->at = now_ms;
        r->used++;
    }
    if (now_ms > b->at) {
        b->tokens += r->rate * (double)(now_ms - b->at) / 1000.0;
        if (b->tokens > r->burst)
            b->tokens = r->burst;
        b->at = now_ms;
    }
    if (b->tokens >= 1) {
        b->tokens -= 1;
    } else {
        wait = (int)ceil((1 - b->tokens) / r->rate);
        if (wait < 1)
            wait = 1;
    }
    pthread_mutex_unlock(&r->mu);
    return wait;
}
