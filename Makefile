# sluice - top-level build.  `make` builds every program into build/; `make SAN=1` builds the
# ASan/UBSan variant into build-san/.  `make run` and `make test` first install missing Debian
# packages (scripts/deps.sh), so both work on a bare Debian 12 machine as root.
#
# Each program lists what it links (OpenSMTPD's SRCS+=): its own folder, found by wildcard,
# and one commented += line for each file of another program's folder it calls, so a
# dependency across programs is a visible line (see "What each program links" below):
#   common/*.c                                   -> libcommon.a, which every program may link
#   <dir>/NAME_main.c + NAME's list              -> build/NAME (program; see PROGS)
#   every source but *_main.c                    -> libsluice.a, for the tests and tools below
#   tests/unit/test_*.c                          -> build/tests/test_* (cmocka; -I per source
#                                                   folder for private headers)
#   tests/tools/*.c                              -> build/tools/*     (test and bench helpers)

SAN ?=
ifeq ($(SAN),1)
B := build-san
OPT := -O1 -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
else
B := build
OPT := -O2
endif

CC ?= cc
PKGS := libuv openssl sqlite3 inih jansson libmicrohttpd libsystemd libidn2 libcurl hiredis \
        libcares
# libspf2 has no .pc file on Debian 12
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS = $(shell pkg-config --libs $(PKGS) 2>/dev/null)
WARN := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
        -Wformat=2 -Wformat-truncation=2 -Wpointer-arith -Wvla -Wno-unused-parameter
CFLAGS += -std=c11 -D_GNU_SOURCE -g $(OPT) $(WARN) -Iinclude -MMD -MP $(PKG_CFLAGS)
LDFLAGS += $(OPT)
LDLIBS += $(PKG_LIBS) -lspf2 -lresolv -lpthread -lm

LIB_DIRS := common queue gateway policy ctl
ALL_SRCS := $(foreach d,$(LIB_DIRS),$(wildcard $(d)/*.c))
MAIN_SRCS := $(filter %_main.c,$(ALL_SRCS))
LIB_SRCS := $(filter-out %_main.c,$(ALL_SRCS))
LIB_OBJS := $(LIB_SRCS:%.c=$(B)/obj/%.o)
PROGS := $(foreach m,$(MAIN_SRCS),$(B)/$(patsubst %_main,%,$(basename $(notdir $(m)))))
COMMON_SRCS := $(wildcard common/*.c)

# --- What each program links ---------------------------------------------------------------
# A program takes its own folder, then one commented += line for each file of another
# program's folder that it calls. Each list becomes an archive, so the linker takes only the
# objects the program reaches; a call across programs that is not listed fails to link.
own = $(filter-out %_main.c,$(wildcard $(1)/*.c))
# The spool (spool*.c): the gateway writes it, the deliverer and sluicectl read it.
SPOOL_SRCS := $(wildcard queue/spool*.c)

GATEWAY_SRCS := $(call own,gateway)
GATEWAY_SRCS += $(SPOOL_SRCS)          # the gateway writes the spool

DELIVER_SRCS := $(call own,queue)
DELIVER_SRCS += gateway/addrmap.c      # the router's map, to reroute by address
DELIVER_SRCS += gateway/smtp_parse.c   # addresses and xtext in DSNs

POLICYD_SRCS := $(call own,policy)
POLICYD_SRCS += $(SPOOL_SRCS)          # where the index is (spool_index_path)

SLUICECTL_SRCS := $(call own,ctl)
SLUICECTL_SRCS += $(SPOOL_SRCS)        # reads the index directly (spool_query.c)
SLUICECTL_SRCS += gateway/addrmap.c gateway/rcptmap_list.c gateway/router.c \
        gateway/smtp_parse.c           # users, route: the gateway's maps
SLUICECTL_SRCS += policy/pol_rules.c   # suspend: the policy daemon's key syntax

# a source no program lists is built for the tests only: say so, it is usually an oversight
UNLISTED := $(filter-out $(COMMON_SRCS) $(GATEWAY_SRCS) $(DELIVER_SRCS) $(POLICYD_SRCS) \
        $(SLUICECTL_SRCS),$(LIB_SRCS))
$(if $(UNLISTED),$(warning warning: linked by no program (add to a *_SRCS list): $(UNLISTED)))

TEST_SRCS := $(wildcard tests/unit/test_*.c)
TESTS := $(TEST_SRCS:tests/unit/%.c=$(B)/tests/%)
TOOL_SRCS := $(wildcard tests/tools/*.c)
TOOLS := $(TOOL_SRCS:tests/tools/%.c=$(B)/tools/%)

PYTEST := /usr/bin/python3 -m pytest
CONF ?= etc/sluice.conf

.PHONY: all deps deps-test run test tests unit e2e bench bench-spool bench-gateway clean \
        install uninstall man deb
# keep test and tool objects: make would otherwise delete them as intermediates and rebuild
.SECONDARY:
all: $(B)/libsluice.a $(B)/libcommon.a $(PROGS) $(TOOLS)

deps:
	@scripts/deps.sh build
deps-test:
	@scripts/deps.sh test

$(B)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c -o $@ $<

$(B)/libsluice.a: $(LIB_OBJS)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(B)/libcommon.a: $(COMMON_SRCS:%.c=$(B)/obj/%.o)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

# a program: its main, its list's archive, then common/
objs = $(patsubst %.c,$(B)/obj/%.o,$(1))
$(B)/lib/sluice-gateway.a: $(call objs,$(GATEWAY_SRCS))
$(B)/lib/sluice-deliver.a: $(call objs,$(DELIVER_SRCS))
$(B)/lib/sluice-policyd.a: $(call objs,$(POLICYD_SRCS))
$(B)/lib/sluicectl.a: $(call objs,$(SLUICECTL_SRCS))
# a list changes in this Makefile: rebuild the archive then too
$(B)/lib/%.a: Makefile
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $(filter %.o,$^)

define prog_rule
$(B)/$(patsubst %_main,%,$(basename $(notdir $(1)))): $(B)/obj/$(1:.c=.o) \
        $(B)/lib/$(patsubst %_main,%,$(basename $(notdir $(1)))).a $(B)/libcommon.a
	$$(CC) $$(LDFLAGS) -o $$@ $$^ $$(LDLIBS)
endef
$(foreach m,$(MAIN_SRCS),$(eval $(call prog_rule,$(m))))
# libmilter only for the policy milter (Debian libmilter-dev)
$(B)/sluice-policyd: LDLIBS += -lmilter

# unit tests reach a folder's private headers by name: -I per folder, never ../../
$(B)/obj/tests/unit/%.o: CFLAGS += $(LIB_DIRS:%=-I%)

$(B)/tests/%: $(B)/obj/tests/unit/%.o $(B)/libsluice.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) -lcmocka

$(B)/tools/%: $(B)/obj/tests/tools/%.o $(B)/libsluice.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

# the durability tests' gateway: the gateway's own main object with its spool_open() wrapped
# by the linker (tests/tools/gateway_fault.c), so no production binary can fail on purpose
$(B)/tools/gateway_fault: $(B)/obj/tests/tools/gateway_fault.o \
                          $(B)/obj/gateway/sluice-gateway_main.o $(B)/libsluice.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -Wl,--wrap=spool_open -o $@ $^ $(LDLIBS)

# run also installs swaks, the client of the README's first example
run: deps
	@scripts/deps.sh run
	@$(MAKE) --no-print-directory all
	@scripts/run.sh $(CONF)

# Every test: unit tests (cmocka), end-to-end (pytest), then the sanitizer build's unit tests
# and end-to-end tests, then each fuzz target briefly (fuzz-smoke).  TORTURE_ROUNDS raises the
# spool crash torture (default 200).
test: deps-test
	@$(MAKE) --no-print-directory all tests
	@$(MAKE) --no-print-directory unit e2e alerts
	@$(MAKE) --no-print-directory SAN=1 all tests
	@$(MAKE) --no-print-directory SAN=1 unit e2e
	@$(MAKE) --no-print-directory fuzz-smoke

tests: $(TESTS) $(TOOLS)

unit: $(TESTS) $(TOOLS)
	@scripts/run-unit.sh $(B)

e2e: $(PROGS) $(TOOLS)
	@SLUICE_BUILD=$(B) scripts/run-e2e.sh

# --- crash torture end to end (tests/e2e/test_torture.py; issue 7) ---
# SIGKILLs gateway and deliverer ROUNDS times under SMTP load into Dovecot and prints the
# figures; `make test` runs the same test with 5 rounds.  SEED=N repeats a run.
ROUNDS ?= 100
.PHONY: torture
torture: $(PROGS) $(TOOLS)
	@SLUICE_BUILD=$(B) SLUICE_TORTURE_ROUNDS=$(ROUNDS) $(if $(SEED),SLUICE_TORTURE_SEED=$(SEED)) \
	    SLUICE_TORTURE_REPORT=$(B)/torture.json scripts/run-e2e.sh tests/e2e/test_torture.py -s
# --- end crash torture ---

# Prometheus alert rules (docs/operations.md "Alerts"): syntax and unit tests with promtool
# (Debian prometheus); part of `make test`
.PHONY: alerts
alerts:
	promtool check rules etc/prometheus/sluice-alerts.yml
	promtool test rules tests/prometheus/sluice-alerts.test.yml

bench-spool: deps-test
	@$(MAKE) --no-print-directory all
	@scripts/bench/bench-spool.sh $(B)

# sluice against Postfix and smtp-sink in the same run (scripts/bench/); QUICK=1 for a smoke
# test. The whole of `make bench` takes about half an hour on 2 cores.
bench-gateway: deps-test
	@$(MAKE) --no-print-directory all
	@scripts/bench/bench-gateway.sh $(B)

# the reseller API with 1,000,000 queued recipients (SCALE=N, AFFECTED=N users of one reseller)
.PHONY: bench-resellers
bench-resellers: deps-test
	@$(MAKE) --no-print-directory all
	@scripts/bench-resellers.sh $(B)

bench: bench-spool bench-gateway

# --- the fleet's figures (tests/e2e/test_fleet.py, docs/fleet.md "Measured") ---
# BENCH_ROUNDS changes of intent on a loopback fleet (3 etcd members, 3 hosts, Dovecot): the
# time from the write in etcd to each host applying it (p50/p99), and the fleet ramp's
# accuracy at Dovecot; the figures go to $(B)/fleet-bench.json.
BENCH_ROUNDS ?= 50
.PHONY: bench-fleet
bench-fleet: deps-test
	@$(MAKE) --no-print-directory all
	@SLUICE_BUILD=$(B) SLUICE_FLEET_ROUNDS=$(BENCH_ROUNDS) SLUICE_FLEET_REPORT=$(B)/fleet-bench.json \
	    scripts/run-e2e.sh tests/e2e/test_fleet.py -s -k "bench or ramp"
	@cat $(B)/fleet-bench.json

# incident scale (issue 12): SCALE recipients through the gateway, every operator command
# timed, the gateway's latency during bulk changes, the deliverer's drain and memory;
# several minutes at the default million (docs/operations.md "What each command costs")
SCALE ?= 1000000
.PHONY: bench-scale
bench-scale: deps
	@$(MAKE) --no-print-directory all
	@SCALE=$(SCALE) scripts/bench-scale.sh $(B)

clean:
	rm -rf build build-san build-fuzz build-deb

# --- Fuzzing (tests/fuzz, docs/security.md "Fuzzing") ------------------------------------
# libFuzzer targets built by clang-14 into build-fuzz/ with ASan+UBSan; the library is compiled
# there too, with the fuzzer's coverage instrumentation. A target is built only when the
# module it fuzzes exists (FUZZ_NEEDS_<name>), so a branch without that module still builds.
#   make fuzz        every target FUZZ_TIME seconds (default 300); new inputs go to
#                    build-fuzz/corpus/, or into the committed seeds with FUZZ_MERGE=1
#   make fuzz-smoke  every target FUZZ_TIME seconds (default 15) from the seeds, then
#                    tests/fuzz/regress/; part of `make test`
FUZZ_CC ?= clang-14
FB := build-fuzz
FUZZ_SAN := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
FUZZ_CFLAGS = -std=c11 -D_GNU_SOURCE -g -O1 $(FUZZ_SAN) \
              $(filter-out -Wformat-truncation=%,$(WARN)) -Iinclude -MMD -MP $(PKG_CFLAGS)
$(FB)/obj/tests/fuzz/%.o: FUZZ_CFLAGS += $(LIB_DIRS:%=-I%)
FUZZ_NEEDS_smtp_cmd := gateway/smtp_parse.c
FUZZ_NEEDS_gw_data := gateway/gw_data.c
FUZZ_NEEDS_conf := common/conf.c
FUZZ_NEEDS_spool_rec := queue/spool_rec.c
FUZZ_NEEDS_milter_reply := gateway/milter_proto.c
FUZZ_NEEDS_proxy := gateway/gw_proxy.c
FUZZ_NEEDS_api := queue/api_route.c
FUZZ_ALL := $(patsubst tests/fuzz/fuzz_%.c,%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_TARGETS := $(foreach t,$(FUZZ_ALL),$(if $(wildcard $(FUZZ_NEEDS_$(t))),$(t)))
FUZZ_BINS := $(FUZZ_TARGETS:%=$(FB)/fuzz_%)
FUZZ_LIB_OBJS := $(LIB_SRCS:%.c=$(FB)/obj/%.o)

.PHONY: fuzz-build fuzz fuzz-smoke
fuzz-build: $(FUZZ_BINS)

# the library with coverage edges but without libFuzzer's main; harnesses link the fuzzer
$(FB)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c -o $@ $<

$(FB)/libsluice.a: $(FUZZ_LIB_OBJS)
	rm -f $@ && ar rcs $@ $^

$(FB)/fuzz_%: $(FB)/obj/tests/fuzz/fuzz_%.o $(FB)/libsluice.a
	$(FUZZ_CC) $(FUZZ_SAN) -fsanitize=fuzzer -o $@ $^ $(LDLIBS)

fuzz: deps-test
	@$(MAKE) --no-print-directory fuzz-build
	@scripts/run-fuzz.sh $(FB) full $(or $(FUZZ_TIME),300) $(FUZZ_TARGETS)

fuzz-smoke: $(FUZZ_BINS)
	@scripts/run-fuzz.sh $(FB) smoke $(or $(FUZZ_TIME),15) $(FUZZ_TARGETS)

-include $(shell find $(FB)/obj -name '*.d' 2>/dev/null)
# --- end of fuzzing ----------------------------------------------------------------------

# ---- install / uninstall (docs/operations.md "Installing") ----------------------------------
# make install [PREFIX=/usr/local] [DESTDIR=] [SYSCONFDIR=/etc]: daemons to sbin, sluicectl to
# bin, the systemd units (paths filled in) with sysusers.d/tmpfiles.d files for the sluice user
# and spool, the docs (Markdown) to share/doc/sluice, the roff man pages to share/man, and
# SYSCONFDIR/sluice/sluice.conf from etc/sluice.conf with system paths -- only if absent, so
# a reinstall never overwrites an operator's configuration. Nothing is chowned or started.
PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
SBINDIR = $(PREFIX)/sbin
BINDIR = $(PREFIX)/bin
DOCDIR = $(PREFIX)/share/doc/sluice
MANDIR = $(PREFIX)/share/man
# systemd reads /usr/local/lib/systemd but the distribution's own units live in /lib (usrmerge)
SYSTEMD_LIB = $(if $(filter /usr,$(PREFIX)),/lib,$(PREFIX)/lib)
UNITDIR = $(SYSTEMD_LIB)/systemd/system
DAEMONS := sluice-gateway sluice-deliver sluice-policyd
UNITS := $(DAEMONS:%=%.service)
INSTALL_SUBST = sed -e 's|@SBINDIR@|$(SBINDIR)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' \
                    -e 's|@DOCDIR@|$(DOCDIR)|g'

install: all man
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(BINDIR) $(DESTDIR)$(DOCDIR) \
	    $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(MANDIR)/man5 \
	    $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSTEMD_LIB)/sysusers.d \
	    $(DESTDIR)$(SYSTEMD_LIB)/tmpfiles.d $(DESTDIR)$(SYSCONFDIR)/sluice
	install -m 0755 $(DAEMONS:%=$(B)/%) $(DESTDIR)$(SBINDIR)/
	install -m 0755 $(B)/sluicectl $(DESTDIR)$(BINDIR)/
	for u in $(UNITS); do \
	    $(INSTALL_SUBST) etc/systemd/$$u >$(DESTDIR)$(UNITDIR)/$$u && \
	    chmod 0644 $(DESTDIR)$(UNITDIR)/$$u || exit 1; done
	install -m 0644 etc/systemd/sluice.sysusers $(DESTDIR)$(SYSTEMD_LIB)/sysusers.d/sluice.conf
	install -m 0644 etc/systemd/sluice.tmpfiles $(DESTDIR)$(SYSTEMD_LIB)/tmpfiles.d/sluice.conf
	install -m 0644 README.md docs/*.md $(DESTDIR)$(DOCDIR)/
	install -m 0644 $(MANS) $(DESTDIR)$(MANDIR)/man8/
	install -m 0644 $(MAN5) $(DESTDIR)$(MANDIR)/man5/
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/sluice/sluice.conf ]; then \
	    echo "keeping $(DESTDIR)$(SYSCONFDIR)/sluice/sluice.conf"; \
	else \
	    echo "installing $(DESTDIR)$(SYSCONFDIR)/sluice/sluice.conf"; \
	    sed -e 's|\./run/spool|/var/spool/sluice|g' -e 's|\./run/mail|/var/lib/sluice/mail|g' \
	        -e 's|= etc/|= $(SYSCONFDIR)/sluice/|' \
	        -e '1s|^|# Installed by make install from etc/sluice.conf with system paths; what\n# the header below says about ./run and make run is about the original.\n|' \
	        etc/sluice.conf \
	        >$(DESTDIR)$(SYSCONFDIR)/sluice/sluice.conf && \
	    chmod 0644 $(DESTDIR)$(SYSCONFDIR)/sluice/sluice.conf; \
	fi
	@[ -e $(DESTDIR)$(SYSCONFDIR)/sluice/recipients ] || \
	    install -m 0644 etc/recipients $(DESTDIR)$(SYSCONFDIR)/sluice/recipients

# Leaves SYSCONFDIR/sluice (the operator's configuration) and the spool alone.
uninstall:
	rm -f $(DAEMONS:%=$(DESTDIR)$(SBINDIR)/%) $(DESTDIR)$(BINDIR)/sluicectl
	rm -f $(UNITS:%=$(DESTDIR)$(UNITDIR)/%)
	rm -f $(DESTDIR)$(SYSTEMD_LIB)/sysusers.d/sluice.conf \
	    $(DESTDIR)$(SYSTEMD_LIB)/tmpfiles.d/sluice.conf
	rm -rf $(DESTDIR)$(DOCDIR)
	rm -f $(MANS:$(B)/man/%=$(DESTDIR)$(MANDIR)/man8/%)
	rm -f $(MAN5:$(B)/man/%=$(DESTDIR)$(MANDIR)/man5/%)
# ---- end install / uninstall -----------------------------------------------------------------


# ---- man pages and the Debian package (docs/operations.md "Installing") ----------------------
# The man pages are written in Markdown (docs/NAME.8.md); go-md2man (Debian go-md2man) makes
# the roff pages build/man/NAME.8 from them, their first line becoming the title block.
# sluice.conf(5) is docs/config.md itself (one text for the web and for man), given a title
# block and a NAME section in place of its first heading.
VERSION := $(shell sed -n 's/^\#define SLUICE_VERSION "\(.*\)"/\1/p' include/version.h)
MAN_SRCS := $(wildcard docs/*.8.md)
MANS := $(MAN_SRCS:docs/%.8.md=$(B)/man/%.8)
MAN5 := $(B)/man/sluice.conf.5
man: $(MANS) $(MAN5)

$(B)/man/%.8: docs/%.8.md include/version.h
	@mkdir -p $(dir $@)
	sed -e '1s/^\([A-Z0-9-]*\)(\([0-9]\)) - \(.*\)$$/% \1 \2 "" "sluice $(VERSION)" "\3"/' $< | \
	    go-md2man -out $@

$(MAN5): docs/config.md include/version.h
	@mkdir -p $(dir $@)
	sed -e '1s/^.*$$/% SLUICE.CONF 5 "" "sluice $(VERSION)" "File Formats Manual"\n\n# NAME\n\nsluice.conf - configuration file of the sluice mail gateway\n\n# DESCRIPTION/' \
	    $< | go-md2man -out $@

# make deb: the package from a copy of the tree in build-deb/ (dpkg-buildpackage writes beside
# the source, so the copy keeps it out of the repository's parent), then lintian, which must
# report no error. The .deb is build-deb/sluice_VERSION-1_ARCH.deb.
DEB_DIR := build-deb
deb:
	@scripts/deps.sh deb
	rm -rf $(DEB_DIR)
	mkdir -p $(DEB_DIR)/sluice-$(VERSION)
	{ git ls-files -co --exclude-standard 2>/dev/null || \
	  find . -path ./build -prune -o -path ./build-san -prune -o -path ./build-fuzz -prune \
	       -o -path ./$(DEB_DIR) -prune -o -path ./.git -prune -o -type f -print; } | \
	    grep -v '^$(DEB_DIR)/' | tar -cf - -T - | tar -xf - -C $(DEB_DIR)/sluice-$(VERSION)
	cd $(DEB_DIR)/sluice-$(VERSION) && dpkg-buildpackage -b -us -uc -j2 >../build.log 2>&1 || \
	    { tail -n 40 ../build.log; exit 1; }
	lintian --fail-on error --suppress-tags-from-file debian/lintian-ignore $(DEB_DIR)/*.changes
	@ls $(DEB_DIR)/*.deb
# ---- end man pages and the Debian package ---------------------------------------------------

-include $(shell find $(B)/obj -name '*.d' 2>/dev/null)
