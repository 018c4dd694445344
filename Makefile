# Entry points (stable): setup, test, demo, bench, dist. See README.md.
SHELL := /bin/bash
# The interpreter ./.venv is built on: Debian's /usr/bin/python3.11 (DEBIAN_PYTHON, which the apt
# step installs) when it exists, else `python3` from PATH; `make setup PYTHON=...` picks another.
# Debian's is built with PGO and LTO, an interpreter from pyenv (often first in PATH) by default
# with neither: ~14 % more CPU in the key service's request handling (in process) and ~20 % on
# Python-heavy loops there (bench/results/profile-issue15.md, round 8). It is also what `make dist` ships the client's
# runtime on, so the tests, the demo and the benchmarks run on the interpreter that ships.
DEBIAN_PYTHON := /usr/bin/python3.11
PYTHON ?=
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

# The interpreter chosen for a new venv, into $$py (after `make apt`, so decided in the shell).
CHOOSE_PYTHON = py='$(PYTHON)'; [ -n "$$py" ] || { py=python3; [ ! -x $(DEBIAN_PYTHON) ] || py=$(DEBIAN_PYTHON); }
REAL_EXE = -c 'import os, sys; print(os.path.realpath(sys.executable), sys.version.split()[0])'

# An existing venv is kept (never deleted here), but `make setup` says which interpreter it runs
# on, and how to rebuild it when that is not the one a new venv would get (e.g. one made on
# pyenv's python3 before DEBIAN_PYTHON became the default).
venv: $(VENV)/.deps-stamp
	@$(CHOOSE_PYTHON); \
	read have hv < <($(PY) $(REAL_EXE)); read want wv < <($$py $(REAL_EXE) 2>/dev/null); \
	echo "$(VENV) runs Python $$hv ($$have)"; \
	if [ -n "$$want" ] && [ "$$have" != "$$want" ]; then \
	  echo "note: a new $(VENV) would run on Python $$wv ($$want); this one is kept."; \
	  echo "      To switch: rm -rf $(VENV) && make setup"; \
	fi

$(VENV)/.deps-stamp: pyproject.toml
	@[ -x $(PY) ] || { $(CHOOSE_PYTHON); echo "creating $(VENV) on $$py"; $$py -m venv $(VENV); }
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
DIST_PYTHON ?= $(DEBIAN_PYTHON)
dist: venv
	$(PY) tools/make_dist.py --python $(DIST_PYTHON)

clean:
	rm -rf build dist $(VENV) pkcs11ws/_native/core.c pkcs11ws/server/_hot.c pkcs11ws/_native/dev-interpreter pkcs11ws/_native/core_api.h pkcs11ws/_native/*.so pkcs11ws/server/*.so *.egg-info
