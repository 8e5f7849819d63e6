/*
 * version.h - the sluice release, shown by every program's -V and in the SMTP banner if the
 * gateway wants it. Bump it with each release.
 */
#ifndef SLUICE_VERSION_H
#define SLUICE_VERSION_H

#define SLUICE_VERSION "0.1.0"

#endif
