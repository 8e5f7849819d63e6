/*
 * fuzz_conf.c - libFuzzer target for the sluice.conf parser (conf.h) through conf_load_mem, the
 * same reader conf_load runs on a file. Checks the contract as well as memory safety: a refused
 * file leaves the caller's config untouched and explains itself in "NAME:LINE: ..." lines; an
 * accepted one dumps (conf_dump) to text that loads again and dumps to the very same text.
 * Each input line is also given to the shared value parsers (sizes, durations, endpoints).
 */
#include <errno.h>
#include <string.h>

#include "conf.h"
#include "fuzz.h"

static char *dump(const struct conf *c, size_t *len)
{
    char *buf = NULL;
    FILE *f = open_memstream(&buf, len);

    FUZZ_CHECK(f != NULL);
    conf_dump(c, f);
    FUZZ_CHECK(fclose(f) == 0);
    return buf;
}

/* Every error line names the file, and there are at most CONF_ERR_MAX (+1 for giving up). */
static void check_errors(const char *err)
{
    int n = 0;

    FUZZ_CHECK(err[0] != '\0');
    for (const char *p = err; *p != '\0'; n++) {
        const char *nl = strchr(p, '\n');
        FUZZ_CHECK(strncmp(p, "fuzz.conf:", 10) == 0);
        if (nl == NULL)
            break;
        FUZZ_CHECK(nl[1] != '\0');       /* no trailing newline */
        p = nl + 1;
    }
    FUZZ_CHECK(n <= CONF_ERR_MAX + 1);
}

static void value_parsers(const char *s, size_t n)
{
    char v[CONF_PATH_MAX];
    struct conf_endpoint ep;
    uint64_t sz;
    int64_t ms;
    int b;

    if (n >= sizeof(v))
        n = sizeof(v) - 1;
    memcpy(v, s, n);
    v[n] = '\0';
    if (conf_parse_size(v, &sz) != 0)
        sz = 0;
    if (conf_parse_duration(v, &ms) == 0)
        FUZZ_CHECK(ms >= 0);
    if (conf_parse_bool(v, &b) == 0)
        FUZZ_CHECK(b == 0 || b == 1);
    for (int host = 0; host < 2; host++) {
        if (conf_parse_endpoint(v, host, &ep) != 0)
            continue;
        FUZZ_CHECK(strlen(ep.host) < sizeof(ep.host));
        FUZZ_CHECK(ep.is_unix ? ep.port == 0 : ep.port != 0);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct conf c, c2, guard;
    static char err[CONF_ERR_LEN];
    size_t l1, l2;
    char *d1, *d2;
    int r;

    memset(&c, 0xA5, sizeof(c));
    memcpy(&guard, &c, sizeof(c));
    r = conf_load_mem(&c, "fuzz.conf", (const char *)data, size, err, sizeof(err));
    FUZZ_CHECK(r == 0 || r == -EINVAL);
    FUZZ_CHECK(memchr(err, '\0', sizeof(err)) != NULL);
    if (r != 0) {
        FUZZ_CHECK(memcmp(&c, &guard, sizeof(c)) == 0); /* a failed reload changes nothing */
        check_errors(err);
    } else {
        FUZZ_CHECK(err[0] == '\0');
        FUZZ_CHECK(c.n_mailstores >= 0 && c.n_mailstores <= CONF_MAILSTORE_MAX);
        d1 = dump(&c, &l1);
        r = conf_load_mem(&c2, "fuzz.conf", d1, l1, err, sizeof(err));
        if (r != 0)
            fprintf(stderr, "dump does not load again:\n%s\n--- dump:\n%s\n", err, d1);
        FUZZ_CHECK(r == 0);
        d2 = dump(&c2, &l2);
        if (l1 != l2 || memcmp(d1, d2, l1) != 0)
            fprintf(stderr, "--- dump:\n%s\n--- dump of its load:\n%s\n", d1, d2);
        FUZZ_CHECK(l1 == l2 && memcmp(d1, d2, l1) == 0);
        free(d1);
        free(d2);
    }

    for (const char *p = (const char *)data, *end = p + size; p < end;) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t len = (size_t)((nl ? nl : end) - p);
        const char *eq = memchr(p, '=', len);

        if (eq != NULL) {   /* the value of "key = value", blanks trimmed */
            const char *v = eq + 1, *ve = p + len;
            while (v < ve && (*v == ' ' || *v == '\t'))
                v++;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t' || ve[-1] == '\r'))
                ve--;
            value_parsers(v, (size_t)(ve - v));
        } else {
            value_parsers(p, len);
        }
        p = nl ? nl + 1 : end;
    }
    return 0;
}
