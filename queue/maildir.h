/*
 * maildir.h - a local Maildir writer for maildir: mailstores (the demo config and small
 * sites). Synchronous and blocking (mkdir, write, fsync): sluice-deliver calls it from a
 * worker thread.
 *
 * Delivery follows the Maildir spec (cr.yp.to/proto/maildir.html): write tmp/NAME, fsync
 * it, link it to new/NAME, unlink tmp/NAME, fsync new/ (so the link is durable before we
 * report success and the spool forgets the message). Missing directories (the mailbox and
 * its cur/ new/ tmp/) are created with mode 0700 and their parents fsynced.
 *
 * Path: the template's %d is the recipient's domain and %u its local part, both lowercased
 * (as Dovecot's default auth_username_format %Lu); %% is a percent sign. Characters that
 * could escape the directory ("/", a leading ".", NUL and control bytes) are written as
 * %XX, so "../x@d" cannot leave the tree.
 *
 * File contents: "Return-Path: <sender>" and "Delivered-To: rcpt" lines, then the message
 * with CRLF line ends turned into LF (the Maildir convention; Dovecot reads both).
 */
#ifndef SLUICE_MAILDIR_H
#define SLUICE_MAILDIR_H

#include <stddef.h>
#include <stdint.h>

#define MAILDIR_PATH_MAX 1024
#define MAILDIR_NAME_MAX 256

/* Expand tmpl for rcpt into out. 0, -EINVAL (no "@", empty part), -ENAMETOOLONG. */
int maildir_path(const char *tmpl, const char *rcpt, char *out, size_t len);
/* A unique file name "SECS.MUSECSPPIDQCOUNTERRRAND.HOST,S=SIZE" (host with "/" as \057 and
 * ":" as \072). 0 or -ENAMETOOLONG. */
int maildir_name(char *out, size_t len, int64_t secs, long usecs, long pid, unsigned long counter,
                 uint32_t rnd, const char *host, uint64_t size);
/* Deliver one message to one recipient. 0 on success. On failure -errno and err says why;
 * -EINVAL means the address cannot be a mailbox (permanent), anything else is temporary. */
int maildir_deliver(const char *tmpl, const char *rcpt, const char *sender, const char *msg,
                    size_t len, char *err, size_t errlen);

#endif
