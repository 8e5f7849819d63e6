/*
 * privs.c - the unprivileged user every daemon ends up as, the spool safety check, handing
 * the spool tree to that user, and the one-way switch. Contract: privs.h.
 *
 * Sections: names and ids, the tree walk (check and own share it), single paths, the switch.
 * The walk goes by directory descriptors (openat/fstatat, never following symlinks), so a
 * path swapped for a symlink mid-walk cannot send a chown elsewhere.
 */
#include "privs.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <pwd.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "log.h"

#define PRIVS_PATH_MAX 4096

enum privs_op { PRIVS_CHECK, PRIVS_OWN };

static int privs_walk(const struct privs *p, enum privs_op op, int dfd, char *path,
                      size_t plen, int depth, char *err, size_t errlen);
static int privs_entry(const struct privs *p, enum privs_op op, int dfd, const char *name,
                       const char *path, const struct stat *st, char *err, size_t errlen);
static int privs_caps_clear(void);

/* --- Names and ids ------------------------------------------------------------------------ */

int privs_init(struct privs *p, const struct conf *c, char *err, size_t errlen)
{
    const struct passwd *pw;
    const struct group *gr;

    memset(p, 0, sizeof(*p));
    p->uid = geteuid();
    p->gid = getegid();
    if (c->spool.user[0] == '\0') {
        if ((pw = getpwuid(p->uid)) != NULL)
            snprintf(p->user, sizeof(p->user), "%s", pw->pw_name);
        if ((gr = getgrgid(p->gid)) != NULL)
            snprintf(p->group, sizeof(p->group), "%s", gr->gr_name);
        return 0;
    }
    if ((pw = getpwnam(c->spool.user)) == NULL) {
        snprintf(err, errlen, "[spool] user: no such user \"%s\"", c->spool.user);
        return -ENOENT;
    }
    p->configured = 1;
    p->uid = pw->pw_uid;
    p->gid = pw->pw_gid;
    snprintf(p->user, sizeof(p->user), "%s", c->spool.user);
    if (c->spool.group[0] != '\0') {
        if ((gr = getgrnam(c->spool.group)) == NULL) {
            snprintf(err, errlen, "[spool] group: no such group \"%s\"", c->spool.group);
            return -ENOENT;
        }
        p->gid = gr->gr_gid;
    }
    if ((gr = getgrgid(p->gid)) != NULL)
        snprintf(p->group, sizeof(p->group), "%s", gr->gr_name);
    else
        snprintf(p->group, sizeof(p->group), "%u", (unsigned)p->gid);
    if (geteuid() == 0) {
        p->switch_ids = p->uid != 0 || p->gid != 0;
        return 0;
    }
    /* Not root: we cannot switch, so we must already be who the spool belongs to. */
    if (geteuid() != p->uid || getegid() != p->gid) {
        snprintf(err, errlen, "[spool] user/group are %s:%s (uid %u, gid %u) but this process "
                 "runs as uid %u, gid %u: start it as root or as %s:%s", p->user, p->group,
                 (unsigned)p->uid, (unsigned)p->gid, (unsigned)geteuid(), (unsigned)getegid(),
                 p->user, p->group);
        return -EPERM;
    }
    return 0;
}

/* --- The tree walk ------------------------------------------------------------------------ */

/* privs_fix - chown fd (an O_PATH descriptor of path) to the user and set its mode: mode, or
 * when 0 the tightened mode for its type. Root does this on the spool user's ground, where an
 * entry can be swapped for a symlink or a hard link to a system file at any moment: so the
 * work is done on the descriptor, and only when it is still the inode that was checked (st:
 * same device and inode), not a link, and root's or the user's. */
static int privs_fix(const struct privs *p, int fd, const char *path, const struct stat *st,
                     mode_t mode, char *err, size_t errlen)
{
    char proc[64];
    struct stat now;
    mode_t cur, want;

    if (fstat(fd, &now) < 0) {
        int e = errno;
        snprintf(err, errlen, "%s: %s", path, strerror(e));
        return -e;
    }
    if (now.st_dev != st->st_dev || now.st_ino != st->st_ino || S_ISLNK(now.st_mode) ||
        (!S_ISDIR(now.st_mode) && now.st_nlink > 1) ||
        (now.st_uid != 0 && now.st_uid != p->uid)) {
        snprintf(err, errlen, "%s: changed while being handed over (now a link, or someone "
                 "else's): refusing to use it", path);
        return -EPERM;
    }
    if ((now.st_uid != p->uid || now.st_gid != p->gid) &&
        fchownat(fd, "", p->uid, p->gid, AT_EMPTY_PATH) < 0) {
        int e = errno;
        snprintf(err, errlen, "chown %s to %s:%s: %s", path, p->user, p->group, strerror(e));
        return -e;
    }
    cur = now.st_mode & 07777;
    if (mode)
        want = mode;
    else if (S_ISDIR(now.st_mode))
        want = (cur & 0750) | 0700;
    else if (S_ISSOCK(now.st_mode))
        want = 0660;           /* the group's members run sluicectl */
    else
        want = (cur & 0640) | 0600;
    /* an O_PATH descriptor takes no fchmod; its /proc name reaches exactly that inode */
    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
    if (want != cur && chmod(proc, want) < 0) {
        int e = errno;
        snprintf(err, errlen, "chmod %s: %s", path, strerror(e));
        return -e;
    }
    return 0;
}

/* privs_own_at - privs_fix for the entry name of directory dfd */
static int privs_own_at(const struct privs *p, int dfd, const char *name, const char *path,
                        const struct stat *st, char *err, size_t errlen)
{
    int fd, r;

    if ((fd = openat(dfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC)) < 0) {
        if (errno == ENOENT)
            return 0;          /* gone meanwhile (a tmp file) */
        r = -errno;
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return r;
    }
    r = privs_fix(p, fd, path, st, 0, err, errlen);
    close(fd);
    return r;
}

/* privs_entry - check or own one entry; st is its lstat. */
static int privs_entry(const struct privs *p, enum privs_op op, int dfd, const char *name,
                       const char *path, const struct stat *st, char *err, size_t errlen)
{
    mode_t mode = st->st_mode & 07777;

    if (op == PRIVS_CHECK) {
        if (st->st_uid != 0 && st->st_uid != p->uid) {
            const struct passwd *pw = getpwuid(st->st_uid);
            snprintf(err, errlen, "%s: owned by %s (uid %u), not by %s%s: refusing to use "
                     "this spool", path, pw ? pw->pw_name : "?", (unsigned)st->st_uid,
                     p->uid == 0 ? "root" : "root or ",
                     p->uid == 0 ? "" : p->user[0] ? p->user : "us");
            return -EPERM;
        }
        /* sluice never makes links in its spool: one found there was planted, to send a
         * root-run chown, chmod or recovery somewhere else */
        if (S_ISLNK(st->st_mode) && name[0] != '\0') {
            snprintf(err, errlen, "%s: a symbolic link inside the spool: refusing to use this "
                     "spool (sluice makes none; remove it)", path);
            return -ELOOP;
        }
        if (!S_ISDIR(st->st_mode) && st->st_nlink > 1) {
            snprintf(err, errlen, "%s: has %lu hard links: refusing to use this spool "
                     "(sluice makes none; remove the other names)", path,
                     (unsigned long)st->st_nlink);
            return -EMLINK;
        }
        if (S_ISSOCK(st->st_mode))
            return 0;          /* a socket is guarded by its directory */
        if (mode & S_IWOTH) {
            snprintf(err, errlen, "%s: world-writable (mode %04o): refusing to use this "
                     "spool; chmod o-w it", path, (unsigned)mode);
            return -EPERM;
        }
        if ((mode & S_IWGRP) && st->st_gid != p->gid) {
            const struct group *gr = getgrgid(st->st_gid);
            snprintf(err, errlen, "%s: writable by group %s (gid %u), not ours (%s): "
                     "refusing to use this spool; chmod g-w or chgrp it", path,
                     gr ? gr->gr_name : "?", (unsigned)st->st_gid,
                     p->group[0] ? p->group : "?");
            return -EPERM;
        }
        return 0;
    }
    /* PRIVS_OWN: only what root or the user owns; privs_check_tree refused anything else. */
    if (st->st_uid != 0 && st->st_uid != p->uid)
        return 0;
    return privs_own_at(p, dfd, name, path, st, err, errlen);
}

/* privs_walk - every entry below the open directory dfd (closed here); path holds its name
 * and has room for PRIVS_PATH_MAX bytes. */
static int privs_walk(const struct privs *p, enum privs_op op, int dfd, char *path,
                      size_t plen, int depth, char *err, size_t errlen)
{
    DIR *d;
    struct dirent *de;
    struct stat st;
    int r = 0;

    if (!(d = fdopendir(dfd))) {
        r = -errno;
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        close(dfd);
        return r;
    }
    while (r == 0 && (errno = 0, de = readdir(d)) != NULL) {
        size_t nlen = strlen(de->d_name);

        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (plen + 1 + nlen >= PRIVS_PATH_MAX) {
            snprintf(err, errlen, "%s/%s: path too long", path, de->d_name);
            r = -ENAMETOOLONG;
            break;
        }
        path[plen] = '/';
        memcpy(path + plen + 1, de->d_name, nlen + 1);
        if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
            if (errno != ENOENT) {  /* gone meanwhile (a tmp file): nothing to check */
                r = -errno;
                snprintf(err, errlen, "%s: %s", path, strerror(errno));
            }
        } else if ((r = privs_entry(p, op, dirfd(d), de->d_name, path, &st, err,
                                    errlen)) == 0 && S_ISDIR(st.st_mode)) {
            int sub;

            if (depth >= PRIVS_TREE_DEPTH) {
                snprintf(err, errlen, "%s: more than %d levels deep: not a sluice spool",
                         path, PRIVS_TREE_DEPTH);
                r = -ELOOP;
            } else if ((sub = openat(dirfd(d), de->d_name,
                                     O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)) < 0) {
                r = -errno;
                snprintf(err, errlen, "%s: %s", path, strerror(errno));
            } else {
                r = privs_walk(p, op, sub, path, plen + 1 + nlen, depth + 1, err, errlen);
            }
        }
        path[plen] = '\0';
    }
    if (r == 0 && errno != 0) {
        r = -errno;
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
    }
    closedir(d);
    return r;
}

/* privs_tree - op on dir itself (symlinks followed: /var/spool/sluice may be a link to a
 * bigger disk) and then on everything below it. */
static int privs_tree(const struct privs *p, enum privs_op op, const char *dir, char *err,
                      size_t errlen)
{
    char path[PRIVS_PATH_MAX];
    struct stat st;
    int fd, r;
    size_t len = strlen(dir);

    if (len >= sizeof(path)) {
        snprintf(err, errlen, "%s: path too long", dir);
        return -ENAMETOOLONG;
    }
    memcpy(path, dir, len + 1);
    /* A missing spool is created here when handing it over (its parent, /var/spool, is
     * root's); a check passes it (spool_open creates it as whoever we are by then). */
    if (op == PRIVS_OWN && mkdir(dir, 0750) < 0 && errno != EEXIST) {
        r = -errno;
        snprintf(err, errlen, "mkdir %s: %s", dir, strerror(errno));
        return r;
    }
    if ((fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
        if (errno == ENOENT)
            return 0;
        r = -errno;
        snprintf(err, errlen, "%s: %s", dir, strerror(errno));
        return r;
    }
    if (fstat(fd, &st) < 0) {
        r = -errno;
        snprintf(err, errlen, "%s: %s", dir, strerror(errno));
        close(fd);
        return r;
    }
    if (op == PRIVS_CHECK) {
        r = privs_entry(p, op, fd, "", path, &st, err, errlen);
    } else if (st.st_uid != 0 && st.st_uid != p->uid) {
        r = 0;
    } else if (fchown(fd, p->uid, p->gid) < 0 || fchmod(fd, 0750) < 0) {
        r = -errno;
        snprintf(err, errlen, "chown/chmod %s: %s", dir, strerror(errno));
    } else {
        r = 0;
    }
    if (r < 0) {
        close(fd);
        return r;
    }
    return privs_walk(p, op, fd, path, len, 1, err, errlen);
}

int privs_check_tree(const struct privs *p, const char *dir, char *err, size_t errlen)
{
    return privs_tree(p, PRIVS_CHECK, dir, err, errlen);
}

int privs_own_tree(const struct privs *p, const char *dir, char *err, size_t errlen)
{
    if (!p->switch_ids)
        return 0;
    return privs_tree(p, PRIVS_OWN, dir, err, errlen);
}

/* --- Single paths ------------------------------------------------------------------------- */

int privs_own_path(const struct privs *p, const char *path, unsigned mode, char *err,
                   size_t errlen)
{
    struct stat st;
    int fd, r;

    if (!p->configured || path[0] == '\0')
        return 0;
    if (lstat(path, &st) < 0) {
        int e = errno;
        if (e == ENOENT)
            return 0;
        snprintf(err, errlen, "%s: %s", path, strerror(e));
        return -e;
    }
    if (S_ISLNK(st.st_mode)) {
        snprintf(err, errlen, "%s: a symlink: not changing its owner", path);
        return -ELOOP;
    }
    if ((fd = open(path, O_PATH | O_NOFOLLOW | O_CLOEXEC)) < 0) {
        int e = errno;
        snprintf(err, errlen, "%s: %s", path, strerror(e));
        return -e;
    }
    r = privs_fix(p, fd, path, &st, (mode_t)mode, err, errlen);
    close(fd);
    return r;
}

/* --- The switch --------------------------------------------------------------------------- */

int privs_as_user(const struct privs *p, int on, char *err, size_t errlen)
{
    if (!p->switch_ids)
        return 0;
    if (on) {
        /* groups and egid first: once euid is the user, they can no longer change */
        if (setgroups(1, &p->gid) < 0 || setegid(p->gid) < 0 || seteuid(p->uid) < 0) {
            int e = errno;
            snprintf(err, errlen, "acting as %s:%s: %s", p->user, p->group, strerror(e));
            return -e;
        }
        return 0;
    }
    if (seteuid(0) < 0 || setegid(0) < 0) {
        int e = errno;
        snprintf(err, errlen, "back to root after acting as %s: %s", p->user, strerror(e));
        return -e;
    }
    return 0;
}

/* privs_caps_clear - a non-root process keeps no capability: systemd's AmbientCapabilities=
 * CAP_NET_BIND_SERVICE was for bind(), which is done. Per thread: threads started before
 * this keep theirs (the unit's CapabilityBoundingSet limits them to that one). */
static int privs_caps_clear(void)
{
    struct __user_cap_header_struct h = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct d[2];

    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
        return -errno;
    memset(d, 0, sizeof(d));
    if (syscall(SYS_capset, &h, d) < 0)
        return -errno;
    return 0;
}

int privs_drop(const struct privs *p, const char *who, char *err, size_t errlen)
{
    uid_t ru, eu, su;
    gid_t rg, eg, sg;
    int r;

    if (p->switch_ids) {
        /* glibc applies each of these to every thread of the process (its setxid broadcast),
         * so spool threads started as root switch too. Groups first: after setuid we could
         * no longer change them. */
        if (setgroups(1, &p->gid) < 0 || setresgid(p->gid, p->gid, p->gid) < 0 ||
            setresuid(p->uid, p->uid, p->uid) < 0) {
            r = -errno;
            snprintf(err, errlen, "switching to %s:%s: %s", p->user, p->group,
                     strerror(errno));
            return r;
        }
        if (setuid(0) == 0 || seteuid(0) == 0 ||
            getresuid(&ru, &eu, &su) < 0 || getresgid(&rg, &eg, &sg) < 0 ||
            ru != p->uid || eu != p->uid || su != p->uid ||
            rg != p->gid || eg != p->gid || sg != p->gid) {
            snprintf(err, errlen, "switching to %s:%s did not stick (root could be regained)",
                     p->user, p->group);
            return -EPERM;
        }
    }
    if (geteuid() != 0 && (r = privs_caps_clear()) < 0) {
        snprintf(err, errlen, "dropping capabilities: %s", strerror(-r));
        return r;
    }
    /* No exec of ours should ever gain privileges (set-id binaries, file capabilities). */
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
        r = -errno;
        snprintf(err, errlen, "PR_SET_NO_NEW_PRIVS: %s", strerror(errno));
        return r;
    }
    if (p->configured)
        umask(027);            /* new files 0640 at most, directories 0750 */
    if (p->switch_ids)
        log_info("%s: dropped privileges to %s:%s (uid %u, gid %u)", who, p->user, p->group,
                 (unsigned)p->uid, (unsigned)p->gid);
    else if (geteuid() == 0)
        log_warn("%s: running as root: set [spool] user (docs/security.md)", who);
    return 0;
}
