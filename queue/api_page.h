/*
 * api_page.h - the reseller's status page: one server-rendered HTML document (no scripts,
 * fonts or anything fetched from elsewhere; it works with JavaScript off) that reloads itself
 * with <meta http-equiv="refresh">. An incident banner per mailstore holding the reseller's
 * mail, the counts, and the affected mailboxes with a search form (GET, so the search
 * survives the reload) and a link to the CSV export.
 *
 * Accessibility: landmarks and headings in order, a skip link, a labelled search field, a
 * table with caption and header cells, times in <time>, colours with at least 4.5:1 contrast
 * and state never told by colour alone. Every text from the data is HTML-escaped.
 */
#ifndef SLUICE_API_PAGE_H
#define SLUICE_API_PAGE_H

#include <stddef.h>

#include "api_view.h"

#define API_PAGE_ROWS 500       /* mailboxes shown; the CSV has them all */

struct api_page_opts {
    int refresh_s;
    const char *search;         /* q=, or NULL */
};

/* The page for t from s, malloc()ed with *len set; NULL when out of memory. */
char *api_page_render(const struct api_snap *s, const struct tenant *t,
                      const struct api_page_opts *o, size_t *len);
/* HTML-escape s (& < > " ') onto f. */
void api_page_escape(void *file, const char *s);

#endif
