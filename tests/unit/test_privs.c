/*
 * test_privs.c - the spool safety check (each refusal, with the path in the message; sockets
 * and symlink targets exempt; depth bound), unknown names, the hand-over's owners and modes,
 * and the switch itself in a forked child (setuid(0) must fail afterwards). The last two need
 * root and are skipped otherwise.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "conf.h"
#include "privs.h"

struct fix {
    char dir[64];
    char err[512];
    struct conf c;
    struct privs p;
};

static void mk(const char *dir, const char *rel, mode_t mode, int is_dir)
{
    char path[256];
    int fd;

    snprintf(path, sizeof(path), "%s/%s", dir, rel);
    if (is_dir) {
        assert_int_equal(mkdir(path, mode), 0);
    } else {
        assert_true((fd = open(path, O_WRONLY | O_CREAT | O_EXCL, mode)) >= 0);
        close(fd);
    }
    assert_int_equal(chmod(path, mode), 0);   /* whatever the umask */
}

static void mksock(const char *dir, const char *rel, mode_t mode)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);

    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s/%s", dir, rel);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    close(fd);
    assert_int_equal(chmod(sa.sun_path, mode), 0);
}

static int setup(void **state)
{
    struct fix *f = calloc(1, sizeof(*f));

    snprintf(f->dir, sizeof(f->dir), "/tmp/test_privs.XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    conf_defaults(&f->c);
    /* a spool as the spool makes it */
    mk(f->dir, "seg", 0700, 1);
    mk(f->dir, "seg/0000000001", 0600, 0);
    mk(f->dir, "big", 0700, 1);
    mk(f->dir, "big/ab", 0700, 1);
    mk(f->dir, "big/ab/msg", 0600, 0);
    mk(f->dir, "index.db", 0600, 0);
    mksock(f->dir, "gateway.ctl", 0666);
    assert_int_equal(privs_init(&f->p, &f->c, f->err, sizeof(f->err)), 0);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fix *f = *state;
    char cmd[256];

    snprintf(cmd, sizeof(cmd), "chmod -R u+rwx %s; rm -rf %s", f->dir, f->dir);
    assert_int_equal(system(cmd), 0);
    free(f);
    return 0;
}

static void test_clean_tree_passes(void **state)
{
    struct fix *f = *state;

    assert_int_equal(privs_check_tree(&f->p, f->dir, f->err, sizeof(f->err)), 0);
    assert_int_equal(f->p.configured, 0);
    assert_int_equal(f->p.uid, geteuid());
}

static void test_missing_spool_passes(void **state)
{
    struct fix *f = *state;
    char path[256];

    snprintf(path, sizeof(path), "%s/not-yet", f->dir);
    assert_int_equal(privs_check_tree(&f->p, path, f->err, sizeof(f->err)), 0);
}

static void test_world_writable_refused(void **state)
{
    struct fix *f = *state;
    char want[320];

    mk(f->dir, "big/ab/evil", 0666, 0);
    assert_int_equal(privs_check_tree(&f->p, f->dir, f->err, sizeof(f->err)), -EPERM);
    snprintf(want, sizeof(want), "%s/big/ab/evil: world-writable (mode 0666)", f->dir);
    assert_non_null(strstr(f->err, want));
}

static void test_world_writable_top_refused(void **state)
{
    struct fix *f = *state;
    char want[320];

    assert_int_equal(chmod(f->dir, 01777), 0);
    assert_int_equal(privs_check_tree(&f->p, f->dir, f->err, sizeof(f->err)), -EPERM);
    snprintf(want, sizeof(want), "%s: world-writable (mode 1777)", f->dir);
    assert_non_null(strstr(f->err, want));
}

static void test_socket_exempt_links_refused(void **state)
{
    struct fix *f = *state;
    char path[256], target[256], want[320];

    /* the 0666 socket from setup is no way in: its directory guards it */
    assert_int_equal(privs_check_tree(&f->p, f->dir, f->err, sizeof(f->err)), 0);
    /* a symlink is: root's recovery or hand-over would follow it out of the spool */
    snprintf(path, sizeof(path), "%s/seg/tmp-link", f->dir);
    assert_int_equal(symlink("/tmp", path), 0);
    assert_int_equal(privs_check_tree(&f->p, f->dir, f->err, sizeof(f->err)), -ELOOP);
    snprintf(want, sizeof(want), "%s: a symbolic link inside the spool", path);
    assert_non_null(strstr(f->err, want));
    assert_int_equal(unlink(path), 0);
    /* and so is a second name for a file: a hard link to a system file gets chowned */
    snprintf(target, sizeof(target), "%s/big/ab/one", f->dir);
    mk(f->dir, "big/ab/one", 0600, 0);
    snprintf(path, sizeof(path), "%s/big/ab/two", f->dir);
    assert_int_equal(link(target, path), 0);
    assert_int_equal(privs_check_tree(&f->p, f->dir, f->err, sizeof(f->err)), -EMLINK);
    assert_non_null(strstr(f->err, "hard links"));
    assert_int_equal(privs_own_tree(&f->p, f->dir, f->err, sizeof(f->err)),
                     f->p.switch_ids ? -EPERM : 0);
}

static void test_foreign_group_and_owner_refused(void **state)
{
    struct fix *f = *state;
    char path[256], want[320];
    const struct passwd *nobody = getpwnam("nobody");

    if (geteuid() != 0 || nobody == NULL)
        skip();
    snprintf(path, sizeof(path), "%s/seg", f->dir);
    assert_int_equal(chown(path, 0, nobody->pw_gid), 0);
    assert_int_equal(chmod(path, 0770), 0);
    assert_int_equal(privs_check_tree(&f->p, f->dir, f->err, sizeof(f->err)), -EPERM);
    snprintf(want, sizeof(want), "%s: writable by group", path);
    assert_non_null(strstr(f->err, want));

    assert_int_equal(chmod(path, 0750), 0);          /* readable by that group: fine */
    assert_int_equal(privs_check_tree(&f->p, f->dir, f->err, sizeof(f->err)), 0);

    snprintf(path, sizeof(path), "%s/index.db", f->dir);
    assert_int_equal(chown(path, nobody->pw_uid, nobody->pw_gid), 0);
    assert_int_equal(privs_check_tree(&f->p, f->dir, f->err, sizeof(f->err)), -EPERM);
    snprintf(want, sizeof(want), "%s: owned by nobody", path);
    assert_non_null(strstr(f->err, want));
}

static void test_too_deep_refused(void **state)
{
    struct fix *f = *state;
    char rel[128] = "d";

    mk(f->dir, rel, 0700, 1);
    for (int i = 0; i < PRIVS_TREE_DEPTH; i++) {
        strcat(rel, "/d");
        mk(f->dir, rel, 0700, 1);
    }
    assert_int_equal(privs_check_tree(&f->p, f->dir, f->err, sizeof(f->err)), -ELOOP);
    assert_non_null(strstr(f->err, "levels deep"));
}

static void test_unknown_names(void **state)
{
    struct fix *f = *state;
    struct privs p;

    snprintf(f->c.spool.user, sizeof(f->c.spool.user), "no-such-sluice-user");
    assert_int_equal(privs_init(&p, &f->c, f->err, sizeof(f->err)), -ENOENT);
    assert_string_equal(f->err, "[spool] user: no such user \"no-such-sluice-user\"");
    if (getpwnam("nobody") == NULL)
        return;
    snprintf(f->c.spool.user, sizeof(f->c.spool.user), "nobody");
    snprintf(f->c.spool.group, sizeof(f->c.spool.group), "no-such-sluice-group");
    assert_int_equal(privs_init(&p, &f->c, f->err, sizeof(f->err)), -ENOENT);
    assert_string_equal(f->err, "[spool] group: no such group \"no-such-sluice-group\"");
}

static void test_own_tree_as_root(void **state)
{
    struct fix *f = *state;
    struct privs p;
    struct stat st;
    char path[256];
    const struct passwd *nobody = getpwnam("nobody");
    static const struct { const char *rel; mode_t mode; } want[] = {
        { "", 0750 }, { "seg", 0700 }, { "seg/0000000001", 0600 }, { "big/ab/msg", 0640 },
        { "gateway.ctl", 0660 }, { "index.db", 0600 },
    };

    if (geteuid() != 0 || nobody == NULL)
        skip();
    snprintf(path, sizeof(path), "%s/big/ab/msg", f->dir);
    assert_int_equal(chmod(path, 0644), 0);          /* loosened by hand: tightened back */
    snprintf(f->c.spool.user, sizeof(f->c.spool.user), "nobody");
    assert_int_equal(privs_init(&p, &f->c, f->err, sizeof(f->err)), 0);
    assert_int_equal(p.switch_ids, 1);
    assert_int_equal(privs_own_tree(&p, f->dir, f->err, sizeof(f->err)), 0);
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", f->dir, want[i].rel);
        assert_int_equal(lstat(path, &st), 0);
        assert_int_equal(st.st_uid, nobody->pw_uid);
        assert_int_equal(st.st_gid, nobody->pw_gid);
        if ((st.st_mode & 07777) != want[i].mode)
            fail_msg("%s: mode %04o, want %04o", path, st.st_mode & 07777, want[i].mode);
    }
    /* and the tree now passes the check for that user */
    assert_int_equal(privs_check_tree(&p, f->dir, f->err, sizeof(f->err)), 0);
}

static void test_drop_is_for_good(void **state)
{
    struct fix *f = *state;
    const struct passwd *nobody = getpwnam("nobody");
    int status;
    pid_t pid;

    if (geteuid() != 0 || nobody == NULL)
        skip();
    snprintf(f->c.spool.user, sizeof(f->c.spool.user), "nobody");
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        struct privs p;
        uid_t r, e, s;

        if (privs_init(&p, &f->c, f->err, sizeof(f->err)) < 0 ||
            privs_drop(&p, "test", f->err, sizeof(f->err)) < 0)
            _exit(10);
        if (setuid(0) == 0 || seteuid(0) == 0)
            _exit(11);
        if (getresuid(&r, &e, &s) < 0 || r != nobody->pw_uid || e != r || s != r)
            _exit(12);
        if (getgroups(0, NULL) != 1 || getegid() != nobody->pw_gid)
            _exit(13);
        if (umask(0) != 027)
            _exit(14);
        _exit(0);
    }
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_clean_tree_passes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing_spool_passes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_world_writable_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_world_writable_top_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_socket_exempt_links_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_foreign_group_and_owner_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_too_deep_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unknown_names, setup, teardown),
        cmocka_unit_test_setup_teardown(test_own_tree_as_root, setup, teardown),
        cmocka_unit_test_setup_teardown(test_drop_is_for_good, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
