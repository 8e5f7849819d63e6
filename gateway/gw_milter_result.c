/*
 * gw_milter_result.c - the values of the milter client's contract (gw_milter_result.h): what
 * the caller gets back, and freeing the envelope changes of end of message.
 */
#include "gw_milter_result.h"

#include <stdlib.h>

void gw_milter_rcpts_free(struct gw_milter_rcptmod *r)
{
    while (r) {
        struct gw_milter_rcptmod *n = r->next;

        free(r->addr);
        free(r->args);
        free(r);
        r = n;
    }
}

void gw_milter_msg_clear(struct gw_milter_msg *msg)
{
    gw_milter_rcpts_free(msg->rcpts);
    msg->rcpts = NULL;
    free(msg->sender);
    free(msg->sender_args);
    msg->sender = msg->sender_args = NULL;
    msg->changed = 0;
}
