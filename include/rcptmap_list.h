/*
 * rcptmap_list.h - enumerate the directory the gateway validates recipients against ([gateway]
 * recipient_map file and recipient_db table, rcptmap.h), for sluicectl users: "every user that
 * routes to a mailstore". Reads the same formats rcptmap_load_file and rcptmap_open_sqlite
 * accept; "@domain" catch-all lines are reported as such (their users cannot be listed).
 */
#ifndef SLUICE_RCPTMAP_LIST_H
#define SLUICE_RCPTMAP_LIST_H

#include <stddef.h>

/* Called once per entry, lowercased ("alice@example.test" or "@example.test"); source is
 * "map" or "db". A non-zero return stops the walk and is returned. */
typedef int (*rcptmap_list_cb)(const char *entry, const char *source, void *arg);

/* Walk the file (if path is not "" or NULL), then the database (likewise). 0, the callback's
 * value, or -errno with err set ("FILE: why"). */
int rcptmap_list(const char *file, const char *db, rcptmap_list_cb cb, void *arg, char *err,
                 size_t errlen);

#endif
