/*
 * privs.h - who a daemon runs as ([spool] user and group) and the one-way switch to it.
 *
 * Every daemon follows the same order (docs/security.md "Privileges and deployment"):
 *   privs_init        resolve the names (conf_load has already checked they exist);
 *   privs_check_tree  refuse a spool an attacker could write to, or holding a symlink or a
 *                     hard link (sluice makes neither): before anything opens it;
 *   ... open what needs root: listeners on ports below 1024, root-only key files ...
 *   privs_own_tree    as root, hand the spool tree to the user (entries owned by root or
 *                     the user only; modes tightened: dirs 0750, files 0640, sockets 0660);
 *   privs_own_path    the same for sockets and files configured outside the spool;
 *   privs_drop        setgroups, setgid, setuid for good, no capabilities left,
 *                     PR_SET_NO_NEW_PRIVS, umask 027; verified (setuid(0) must fail).
 * Without a configured user the own calls do nothing and privs_drop only sheds capabilities
 * (systemd's AmbientCapabilities) and warns when the process is root.
 *
 * All functions return 0 or -errno, with the reason (naming the path) in err.
 */
#ifndef SLUICE_PRIVS_H
#define SLUICE_PRIVS_H

#include <stddef.h>
#include <sys/types.h>

#include "conf.h"

#define PRIVS_TREE_DEPTH 8   /* the spool is 3 levels deep; deeper is not ours */

struct privs {
    int configured;          /* [spool] user is set */
    int switch_ids;          /* configured and we are root: privs_drop changes ids */
    uid_t uid;               /* the owner the spool must have (ours when not configured) */
    gid_t gid;
    char user[CONF_NAME_MAX];
    char group[CONF_NAME_MAX];
};

/* Resolve c->spool.user/group. Started as a non-root user other than the configured one is an
 * error (we could not switch, and the spool would be someone else's). */
int privs_init(struct privs *p, const struct conf *c, char *err, size_t errlen);
/* Refuse dir when it or anything in it (not following symlinks) is world-writable (sockets
 * aside: they are reached through the directory), group-writable with a group other than
 * ours, or owned by a user other than root and ours. A missing dir is fine (created later). */
int privs_check_tree(const struct privs *p, const char *dir, char *err, size_t errlen);
/* As root with a configured user: create dir (0750) if missing, chown the tree to uid:gid and
 * tighten modes. Else 0. */
int privs_own_tree(const struct privs *p, const char *dir, char *err, size_t errlen);
/* With a configured user: chown path to uid:gid and chmod it to mode (when path exists; a
 * missing path is not an error). After the switch only the mode can change. Else 0. */
int privs_own_path(const struct privs *p, const char *path, unsigned mode, char *err,
                   size_t errlen);
/* As root with a configured user: on = act as the user for now (supplementary groups, egid,
 * euid; the saved uid stays 0), off = back to root. For work on the user's files that must
 * happen before the binds: the gateway opens and recovers its spool this way, so a link
 * planted in the spool cannot turn recovery's unlinks and creates into root's. Else 0. */
int privs_as_user(const struct privs *p, int on, char *err, size_t errlen);
/* The switch; who names the program in the log line. */
int privs_drop(const struct privs *p, const char *who, char *err, size_t errlen);

#endif
