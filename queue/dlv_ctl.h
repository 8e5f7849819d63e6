/*
 * dlv_ctl.h - sluice-deliver's control socket: the commands of the control protocol
 * (ctl_proto.h) that concern queues and mailstores, on top of ctl_server.h.
 *
 * Socket: [control] deliver_socket (default <spool dir>/deliver.ctl), mode 0666; root, the
 * daemon's uid and members of [control] admin_group may change state, others only read.
 * Requests and replies (all replies also carry "v":1 and "ok"):
 *   status                       -> "daemon","pid","version","spool":{"dir","free_bytes"},
 *                                   "mailstores":[{name,state,reason,since,actor,transport,
 *                                   inflight,connections,ready,fails,rate,cwnd,delivered,
 *                                   deferred,held_total,trips,queued,held,due,messages,bytes,
 *                                   oldest_queued,oldest_held,cause,trouble,reply_ms,
 *                                   normal_reply_ms,slow_bound_ms,closing},...]
 *   queue {mailstore,state,sender,rcpt,older_than,limit} -> "recipients":[...],"total","more"
 *   show {qid,body}              -> "message":{...,"recipients":[...],"body"?}
 *   affected {mailstore,domain,after,limit,rows,counts_only} -> "recipients":[{rcpt,queued,
 *                                   held,messages,oldest,last_reply}] by address
 *                                   (spool_query_users), "more", "next_after" (where the next
 *                                   page starts) when more; with "rows":true "columns" and
 *                                   "rows" (arrays) instead; with "counts_only":true no
 *                                   last_reply (cheaper: users). With domain and without
 *                                   counts_only: the reseller API's query
 *                                   (spool_query_domain_users: also mailstore, last_attempt;
 *                                   "domain"), paged by after/limit in its address order
 *   audit {limit,since}          -> "audit":[{id,at,uid,user,daemon,cmd,scope,reason,args,
 *                                   count,result},...]
 *   pause {mailstore,reason,public_reason,wait} -> "mailstore","state","count" (recipients
 *                                   now waiting), "stopped","finishing"; public_reason is
 *                                   what resellers see
 *   reseller {action,name,domains} -> "count" (the tenant's domains): sluicectl changed the
 *                                   tenants file; it is read again and the change audited
 *   release {mailstore,rate,ramp} -> "mailstore","state","due","count"
 *   hold {qid|mailstore,reason,wait}, unhold {qid|mailstore}, retry {qid|mailstore},
 *   delete {qid,wait}, reroute {mailstore,to,rcpt,wait} -> "count" (recipients changed);
 *                                   hold, delete and reroute also "stopped","finishing"
 * pause, hold, delete and reroute stop what is in flight for their scope (dlv.h): "stopped"
 * transactions were ended before their final dot, "finishing" ones were past it. With
 * "wait": true (or seconds) the reply comes once none is in flight any more and every
 * outcome is recorded, with "waited": true and "still_finishing" (0 unless the wait, at most
 * 15 minutes, ran out).
 * Every write command leaves an audit row (audit.h) with the caller's user name, the scope,
 * the reason and the count, whether it succeeded or not. The first protocol (no "v":
 * status, pause, release) is still answered in its own reply shape.
 * Commands run on the module's own threads, never on the libuv pool the deliveries use; a
 * read is bounded by [control] query_timeout and stopped when its client goes away.
 */
#ifndef SLUICE_DLV_CTL_H
#define SLUICE_DLV_CTL_H

#include <jansson.h>
#include <stddef.h>
#include <uv.h>

#include "conf.h"
#include "dlv.h"

struct dlv_ctl;

/* Listen on c's deliver socket (a stale socket file is replaced; a live one is -EADDRINUSE).
 * c is read now and on dlv_ctl_reload only. */
int dlv_ctl_start(struct dlv_ctl **ctl, uv_loop_t *loop, struct dlv *d, struct spool *sp,
                  const struct conf *c, char *err, size_t errlen);
void dlv_ctl_reload(struct dlv_ctl *ctl, const struct conf *c);
/* The reseller API that the reseller command reloads (NULL: none). */
struct api;
void dlv_ctl_set_api(struct dlv_ctl *ctl, struct api *api);
/* fn(arg), on the loop thread, gives what the status reply carries under key (a new
 * reference, or NULL): how another module (the fleet) adds its part. */
void dlv_ctl_status_hook(struct dlv_ctl *ctl, const char *key, json_t *(*fn)(void *arg),
                         void *arg);
/* Close the listener (unlinking the path) and every client; run the loop, then free. */
void dlv_ctl_stop(struct dlv_ctl *ctl);
void dlv_ctl_free(struct dlv_ctl *ctl);

#endif
