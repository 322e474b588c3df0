# netpol: build, install, package.
#
#   make build                          cargo build --release --locked
#   make install DESTDIR=/tmp/x PREFIX=/usr
#   make deb                            dist/netpol_<version>_<arch>.deb
#   make rpm                            dist/netpol-<version>-1.<arch>.rpm
#   make test                           cargo test
#   make demo                           scripts/demo (root)
#
# `make install` is the one install recipe: debian/rules and packaging/netpol.spec
# both call it. It installs what `make build` built and never builds itself, so a
# package build under fakeroot or rpmbuild never runs cargo.
#
# Offline builds: cargo honours CARGO_NET_OFFLINE=true (or pass OFFLINE=1 here);
# with a vendored or already-fetched registry (~/.cargo/registry) nothing is
# downloaded. `--locked` keeps Cargo.lock as committed.

SHELL := /bin/bash

CARGO ?= cargo
# Cargo profile: release for packages; `PROFILE=dev` reuses a debug build (the
# packaging test does this to avoid a second full build).
PROFILE ?= release
PROFILE_DIR := $(if $(filter dev,$(PROFILE)),debug,$(PROFILE))
CARGO_TARGET_DIR ?= target
BINDIR_BUILD := $(CARGO_TARGET_DIR)/$(PROFILE_DIR)

ifneq ($(OFFLINE),)
export CARGO_NET_OFFLINE := true
endif

VERSION := $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)

PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
SBINDIR ?= $(PREFIX)/sbin
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
MANDIR ?= $(PREFIX)/share/man
DOCDIR ?= $(PREFIX)/share/doc/netpol

INSTALL ?= install
DIST ?= dist

# Documents installed under DOCDIR besides the examples.
DOCS := README.md $(wildcard docs/*.md)

.PHONY: all build install uninstall deb rpm test demo dist-clean check-unit help

all: build

help:
	@sed -n '2,9s/^# \{0,1\}//p' Makefile

build:
	$(CARGO) build --profile $(PROFILE) --locked --bins

# The installed tree. Paths inside the unit follow SBINDIR/BINDIR.
install:
	@for b in $(BINDIR_BUILD)/netpold $(BINDIR_BUILD)/netpolctl; do \
	  [ -x "$$b" ] || { echo "make install: $$b is missing; run 'make build' first" >&2; exit 1; }; \
	done
	$(INSTALL) -d -m 0755 $(DESTDIR)$(SBINDIR) $(DESTDIR)$(BINDIR)
	$(INSTALL) -m 0755 $(BINDIR_BUILD)/netpold $(DESTDIR)$(SBINDIR)/netpold
	$(INSTALL) -m 0755 $(BINDIR_BUILD)/netpolctl $(DESTDIR)$(BINDIR)/netpolctl
	$(INSTALL) -d -m 0755 $(DESTDIR)$(UNITDIR)
	sed -e 's|/usr/sbin/netpold|$(SBINDIR)/netpold|g' \
	    -e 's|/usr/bin/netpolctl|$(BINDIR)/netpolctl|g' \
	    -e 's|/usr/share/doc/netpol/|$(DOCDIR)/|g' \
	    systemd/netpold.service > $(DESTDIR)$(UNITDIR)/netpold.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/netpold.service
	$(INSTALL) -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/netpol $(DESTDIR)$(SYSCONFDIR)/netpol/endpoints.d \
	    $(DESTDIR)$(SYSCONFDIR)/netpol.d
	$(INSTALL) -m 0644 etc/netpol/netpold.toml $(DESTDIR)$(SYSCONFDIR)/netpol/netpold.toml
	$(INSTALL) -d -m 0755 $(DESTDIR)$(MANDIR)/man8
	$(INSTALL) -m 0644 man/netpold.8 man/netpolctl.8 $(DESTDIR)$(MANDIR)/man8/
	$(INSTALL) -d -m 0755 $(DESTDIR)$(DOCDIR)
	$(INSTALL) -m 0644 $(DOCS) $(DESTDIR)$(DOCDIR)/
	cd etc/examples && find . -type d -exec $(INSTALL) -d -m 0755 '$(DESTDIR)$(DOCDIR)/examples/{}' \;
	cd etc/examples && find . -type f -exec $(INSTALL) -m 0644 '{}' '$(DESTDIR)$(DOCDIR)/examples/{}' \;
	cd etc/examples && find . -type f -name '*.sh' -exec chmod 0755 '$(DESTDIR)$(DOCDIR)/examples/{}' \;

# Removes what `install` put in place, except /etc (the administrator's files).
uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/netpold $(DESTDIR)$(BINDIR)/netpolctl \
	    $(DESTDIR)$(UNITDIR)/netpold.service \
	    $(DESTDIR)$(MANDIR)/man8/netpold.8 $(DESTDIR)$(MANDIR)/man8/netpolctl.8
	rm -rf $(DESTDIR)$(DOCDIR)

# `systemd-analyze verify` of the unit as installed (into dist/verify, with the
# paths in the unit pointing there so its binaries exist), and its exposure score;
# then the same with fleet mode's drop-in added.
VERIFY_ROOT := $(CURDIR)/$(DIST)/verify
check-unit:
	rm -rf $(VERIFY_ROOT)
	$(MAKE) --no-print-directory install DESTDIR= PREFIX=$(VERIFY_ROOT)/usr SYSCONFDIR=$(VERIFY_ROOT)/etc >/dev/null
	systemd-analyze verify --man=no $(VERIFY_ROOT)/usr/lib/systemd/system/netpold.service
	systemd-analyze security --offline=true --threshold=25 $(VERIFY_ROOT)/usr/lib/systemd/system/netpold.service | tail -n1
	@# Fleet mode's drop-in (etc/examples/systemd/netpold-etcd.conf) on top.
	$(INSTALL) -D -m 0644 etc/examples/systemd/netpold-etcd.conf $(VERIFY_ROOT)/usr/lib/systemd/system/netpold.service.d/etcd.conf
	systemd-analyze verify --man=no $(VERIFY_ROOT)/usr/lib/systemd/system/netpold.service
	systemd-analyze security --offline=true --threshold=25 $(VERIFY_ROOT)/usr/lib/systemd/system/netpold.service | tail -n1

# Debian package, into dist/: the .deb, .buildinfo and .changes that
# dpkg-buildpackage would put next to the source tree (..) go to dist/ instead.
# NETPOL_PROFILE reaches debian/rules.
DEB_ARCH := $(shell dpkg --print-architecture 2>/dev/null)
DEB_BASE := $(CURDIR)/$(DIST)/netpol_$(VERSION)_$(DEB_ARCH)
deb:
	mkdir -p $(DIST)
	rm -f $(DEB_BASE).deb $(DEB_BASE).buildinfo $(DEB_BASE).changes
	NETPOL_PROFILE=$(PROFILE) NETPOL_DEB_DESTDIR=$(CURDIR)/$(DIST) dpkg-buildpackage -b -us -uc \
	    --buildinfo-option=-u$(CURDIR)/$(DIST) --buildinfo-file=$(DEB_BASE).buildinfo \
	    --changes-option=-u$(CURDIR)/$(DIST) --changes-file=$(DEB_BASE).changes
	@echo "built $(DIST)/netpol_$(VERSION)_$(DEB_ARCH).deb"

# RPM package from the binaries `make build` made, installed by `make install`
# inside rpmbuild. Without the systemd rpm macros (Debian's rpm has none), the
# fallback in packaging/ is loaded.
RPM_TOPDIR := $(CURDIR)/$(DIST)/rpmbuild
RPM_SYSTEMD_MACROS := $(shell rpm --eval '%{?systemd_post:yes}' 2>/dev/null)
rpm: build
	rm -rf $(RPM_TOPDIR)
	mkdir -p $(RPM_TOPDIR) $(DIST)
	rpmbuild -bb --nodeps \
	    $(if $(RPM_SYSTEMD_MACROS),,--load=$(CURDIR)/packaging/macros.systemd-fallback) \
	    --define '_topdir $(RPM_TOPDIR)' \
	    --define 'netpol_srcdir $(CURDIR)' \
	    --define 'netpol_version $(VERSION)' \
	    --define 'netpol_profile $(PROFILE)' \
	    packaging/netpol.spec
	cp -f $(RPM_TOPDIR)/RPMS/*/netpol-$(VERSION)-*.rpm $(DIST)/
	@ls -1 $(DIST)/netpol-$(VERSION)-*.rpm

test:
	$(CARGO) test --locked

demo:
	scripts/demo

# Only what packaging made; never `cargo clean`.
dist-clean:
	rm -rf $(DIST)
