/*
 * gw_milter_edit.h - the message side of the milter client (private to gw_milter*.c and its
 * unit test): the header index milters are shown, and one milter's end-of-message changes,
 * kept while it sends them and applied to the message (and the envelope) after its final
 * reply. Refusals come back as -errno with the reason in why (GW_M_WHY_MAX); failing the
 * milter is the caller's job.
 */
#ifndef SLUICE_GW_MILTER_EDIT_H
#define SLUICE_GW_MILTER_EDIT_H

#include <stddef.h>

#include "gw_milter_core.h"

/* keep one change for after the final reply: 0, or -errno (refused: a change not
 * negotiated, over a cap, too large, out of memory) */
int medit_keep(struct mconn *c, const struct milter_reply *r, char *why, size_t wl);
/* apply c's changes to c->ms->msg, all or nothing; frees the edit list: 0 or -errno */
int medit_apply(struct mconn *c, char *why, size_t wl);
/* forget c's changes (the edit list and a collected replacement body) */
void mc_edits_free(struct mconn *c);
/* how many header fields the text of our own fields holds (at most GW_M_OWN_MAX) */
int own_count(const char *own);
/* index the header fields of ms->msg into ms->hdrs and ms->body_off: 0 or -ENOMEM */
int ms_index_headers(struct gw_milter_sess *ms);
/* the field of a milter's header change, refolded, malloc()ed; NULL when out of memory */
char *field_make(const char *name, const char *value, int leadspc, size_t *len);

#endif
