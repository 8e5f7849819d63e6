/*
 * fuzz_api.c - libFuzzer target for what a reseller (or anyone on the network) and the
 * tenants file feed the reseller API: the request path (api_route_unescape, then
 * api_route_match) and the tenants file parser (tenants_parse). Invariants: a matched domain
 * is in normal form (normalising it again changes nothing); a parsed tenants file gives
 * every domain to one tenant only, in normal form, each tenant owning its own.
 * Input: the first line is the path, the rest is a tenants file.
 */
#include <string.h>

#include "api_route.h"
#include "domain.h"
#include "fuzz.h"
#include "tenants.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *nl = memchr(data, '\n', size);
    size_t plen = nl ? (size_t)(nl - data) : size;
    char path[API_PATH_MAX + 8], again[DOMAIN_MAX], err[4096];
    struct api_route r;
    struct tenants *ts;

    if (plen < sizeof(path)) {
        memcpy(path, data, plen);
        path[plen] = '\0';
        size_t n = api_route_unescape(path);
        FUZZ_CHECK(n <= plen);
        api_route_match(path, &r);
        if (r.kind == API_R_DOMAIN || r.kind == API_R_DOMAIN_USERS ||
            r.kind == API_R_DOMAIN_USERS_CSV) {
            FUZZ_CHECK(domain_norm(r.domain, again, sizeof(again)) == 0);
            FUZZ_CHECK(strcmp(again, r.domain) == 0);
        } else {
            FUZZ_CHECK(r.domain[0] == '\0');
        }
    }
    if (!nl)
        return 0;
    if (tenants_parse(&ts, "fuzz", (const char *)nl + 1, size - plen - 1, err, sizeof(err)) < 0)
        return 0;
    for (int i = 0; i < ts->n; i++) {
        const struct tenant *t = &ts->t[i];
        FUZZ_CHECK(tenants_name_ok(t->name) && tenants_find(ts, t->name) == t);
        for (int k = 0; k < t->ndomains; k++) {
            FUZZ_CHECK(domain_norm(t->domains[k], again, sizeof(again)) == 0);
            FUZZ_CHECK(strcmp(again, t->domains[k]) == 0);
            FUZZ_CHECK(tenant_owns(t, t->domains[k]));
            for (int j = 0; j < ts->n; j++)
                FUZZ_CHECK(j == i || !tenant_owns(&ts->t[j], t->domains[k]));
        }
    }
    tenants_free(ts);
    return 0;
}
