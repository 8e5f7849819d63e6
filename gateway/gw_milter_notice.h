/*
 * gw_milter_notice.h - rejection notices (private to gw_milter*.c): the milters configured
 * with notify_rejections hear of every refusal as an X-SLUICE-REJECT unknown command, held
 * while they are inside a transaction.
 */
#ifndef SLUICE_GW_MILTER_NOTICE_H
#define SLUICE_GW_MILTER_NOTICE_H

#include "gw_milter_core.h"

/* send the notices held while the milter was in a transaction */
void mc_notices_flush(struct mconn *c);
/* tell the notify_rejections milters other than by (NULL: none) that source refused the
 * client at stage with code; sender: the envelope sender, NULL before MAIL */
void ms_notify(struct gw_milter_sess *ms, const struct mconn *by, const char *source,
               const char *stage, int code, const char *sender);

#endif
