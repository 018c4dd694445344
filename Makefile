# Entry points (stable): setup, test, demo, bench, dist. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# python3-venv (ensurepip, for `python3 -m venv`) and python3-dev (Python.h and libpython for the
# Cython core and the C loader) are not on a stock Debian 12; systemd gives systemd-analyze, which
# checks conf/pkcs11ws-server.service (tests/cli/test_server_systemd.py). python3.11, -dev, -venv and
# libpython3.11: Debian's interpreter, which `make dist` builds the client tarball's runtime on.
# gdb: a test whose child hangs fails with every thread's C stack (tests/support/stacks.py).
APT_PKGS := build-essential pkg-config python3-venv python3-dev libcurl4-openssl-dev libssl-dev curl \
	opensc softhsm2 openssl p11-kit p11-kit-modules time gnutls-bin opensc-pkcs11 \
	openjdk-17-jdk-headless systemd python3.11 python3.11-dev python3.11-venv libpython3.11 \
	postgresql libpq5 libpq-dev gdb
# Consumers only in bookworm-backports (tests/consumers/test_dropin_openssl.py): see apt-backports.
BACKPORTS_PKGS := pkcs11-provider

.PHONY: setup apt apt-backports venv build test check pytest demo bench dist clean

setup: apt venv build

# Install Debian packages only when one is missing (idempotent, no apt run otherwise).
apt:
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@$(MAKE) --no-print-directory apt-backports

# BACKPORTS_PKGS when missing, without changing the machine's apt sources: on bookworm a private
# source list (the machine's own Debian mirror, suite bookworm-backports) with private list and
# cache folders, used for this one install and then removed; on later releases from main.
apt-backports:
	@missing=""; for p in $(BACKPORTS_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	[ -n "$$missing" ] || exit 0; \
	SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	. /etc/os-release; \
	if [ "$$VERSION_CODENAME" != bookworm ]; then \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; exit $$?; \
	fi; \
	mirror=$$(apt-get indextargets --format '$$(REPO_URI) $$(RELEASE)' 'Created-By: Packages' \
	  | awk '$$2 == "bookworm" {print $$1; exit}'); \
	[ -n "$$mirror" ] || { echo "apt-backports: no bookworm source to derive a mirror from"; exit 1; }; \
	echo "installing from bookworm-backports:$$missing"; \
	d=$$(mktemp -d); chmod 755 $$d; mkdir -p $$d/lists/partial $$d/cache/archives/partial; \
	echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $$mirror bookworm-backports main" \
	  > $$d/sources.list; \
	o="-o Dir::Etc::SourceList=$$d/sources.list -o Dir::Etc::SourceParts=/dev/null"; \
	o="$$o -o Dir::State::Lists=$$d/lists -o Dir::Cache=$$d/cache"; \
	$$SUDO apt-get $$o update -qq \
	  && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get $$o install -y -qq $$missing; \
	rc=$$?; $$SUDO rm -rf $$d; exit $$rc

venv: $(VENV)/.deps-stamp

$(VENV)/.deps-stamp: pyproject.toml
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel "Cython>=3.0"
	@# pycurl from source against the system libcurl (design.md section 3): never the bundled
	@# wheel, whose own libcurl/OpenSSL crash inside hosts that link the system OpenSSL.
	$(PIP) install -q --no-binary pycurl --no-build-isolation -e ".[server,dev]"
	@touch $@

build: venv
	$(PIP) install -q --no-binary pycurl --no-build-isolation --no-deps -e .

test: check pytest

check:
	bash ci/check.sh

pytest:
	$(PY) -m pytest -q

demo:
	$(PY) -m pkcs11ws.demo

bench:
	$(PY) -m bench

# The client tarball dist/pkcs11ws-client-<version>-linux-<arch>.tar.gz (tools/make_dist.py):
# a runtime on Debian's python3.11 (DIST_PYTHON), to extract at / on an application server.
DIST_PYTHON ?= /usr/bin/python3.11
dist: venv
	$(PY) tools/make_dist.py --python $(DIST_PYTHON)

clean:
	rm -rf build dist $(VENV) pkcs11ws/_native/core.c pkcs11ws/server/_hot.c pkcs11ws/_native/dev-interpreter pkcs11ws/_native/core_api.h pkcs11ws/_native/*.so pkcs11ws/server/*.so *.egg-info
