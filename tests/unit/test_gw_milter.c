/*
 * test_gw_milter.c - the milter client's message surgery, tested on its internals (the file
 * is included): header fields built from milter values, HEADER packets for long client
 * fields, edit caps, CHGHEADER indexes and our own fields, envelope edits and REPLBODY.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "../../gateway/gw_milter.c"

/* field_sane - f[0..n) is one header field: ends with CRLF, no bare CR or LF, every line
 * after the first starts with white space and has something else on it */
static int field_sane(const char *f, size_t n)
{
    if (n < 3 || f[n - 2] != '\r' || f[n - 1] != '\n')
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (f[i] == '\r' && (i + 1 >= n || f[i + 1] != '\n'))
            return 0;
        if (f[i] == '\n' && (i == 0 || f[i - 1] != '\r'))
            return 0;
        if (f[i] == '\n' && i + 1 < n) {
            size_t j = i + 1;

            if (f[j] != ' ' && f[j] != '\t')
                return 0;
            while (j < n && (f[j] == ' ' || f[j] == '\t'))
                j++;
            if (j >= n || f[j] == '\r')
                return 0; /* white space only: the header section would end here */
        }
    }
    return 1;
}

static void check_field(const char *value, const char *want)
{
    size_t n = 0;
    char *f = field_make("X-Test", value, 0, &n);

    assert_non_null(f);
    assert_true(field_sane(f, n));
    if (want) {
        assert_int_equal(n, strlen(want));
        assert_memory_equal(f, want, n);
    }
    free(f);
}

/* item 1: many LFs (each was 3 bytes out of 1 in) overflowed the buffer */
static void test_field_make_many_lf(void **state)
{
    size_t vl = 100000;
    char *v = malloc(vl + 1);

    (void)state;
    assert_non_null(v);
    memset(v, '\n', vl);
    v[vl] = '\0';
    check_field(v, "X-Test: \r\n");
    for (size_t i = 0; i < vl; i += 2)
        v[i + 1] = 'a';
    check_field(v, NULL);
    for (size_t i = 0; i < vl; i++)
        v[i] = i % 3 == 2 ? 'b' : '\n';
    check_field(v, NULL);
    free(v);
}

/* item 2: no empty or white-space-only line out of any value */
static void test_field_make_no_injection(void **state)
{
    (void)state;
    check_field("a\n", "X-Test: a\r\n");
    check_field("a\r\n", "X-Test: a\r\n");
    check_field("a\r", "X-Test: a\r\n");
    check_field("a \t\r\n \n", "X-Test: a\r\n");
    check_field("a\n\nEvil: 1", "X-Test: a\r\n\tEvil: 1\r\n");
    check_field("a\n \nb", "X-Test: a\r\n\tb\r\n");
    check_field("a\r\rb", "X-Test: a\r\n\tb\r\n");
    check_field("a\rb", "X-Test: a\r\n\tb\r\n");
    check_field("a\n\tb", "X-Test: a\r\n\tb\r\n");
    check_field("a\r\n b", "X-Test: a\r\n b\r\n");
    check_field("\nb", "X-Test: \r\n\tb\r\n");
    check_field("", "X-Test: \r\n");
    check_field("\t\n\r\n\r", "X-Test: \r\n");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_field_make_many_lf),
        cmocka_unit_test(test_field_make_no_injection),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
