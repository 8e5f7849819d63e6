/*
 * gw_milter_core.c - the small helpers every part of the milter client shares
 * (gw_milter_core.h): state and stage names, the packet scratch, the queue ID for log lines,
 * connection state changes and the session's macros.
 */
#include "gw_milter_core.h"

#include <string.h>

#include "log.h"

const char *const mc_state_names[] = {
#define XX(name, text) #name,
    GW_MC_STATE_MAP(XX)
#undef XX
};

const char *const ms_stage_names[] = { "CONNECT", "HELO", "MAIL", "RCPT", "RCPT",
                                       "DATA", "END-OF-MESSAGE" };

char gw_m_scratch[GW_M_SCRATCH];

const char *ms_qid(const struct gw_milter_sess *ms)
{
    return ms->qid[0] ? ms->qid : "NOQUEUE";
}

void mc_enter(struct mconn *c, enum mc_state st)
{
    if (c->state == st)
        return;
    log_debug("%s: milter %s: state %s -> %s", ms_qid(c->ms), c->name,
              mc_state_names[c->state], mc_state_names[st]);
    c->state = st;
}

/* macro_match - "i" matches "{i}" and the other way round */
static int macro_match(const char *a, size_t al, const char *b)
{
    size_t bl = strlen(b);

    if (al >= 2 && a[0] == '{' && a[al - 1] == '}') {
        a++;
        al -= 2;
    }
    if (bl >= 2 && b[0] == '{' && b[bl - 1] == '}') {
        b++;
        bl -= 2;
    }
    return al == bl && memcmp(a, b, al) == 0;
}

const struct mmacro *ms_macro_find(const struct gw_milter_sess *ms, const char *name,
                                   size_t nl)
{
    for (int i = 0; i < GW_M_MACROS; i++)
        if (ms->macros[i].value && macro_match(name, nl, ms->macros[i].name))
            return &ms->macros[i];
    return NULL;
}
