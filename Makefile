# Entry points (stable): setup, test, demo, bench. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
APT_PKGS := build-essential pkg-config libcurl4-openssl-dev libssl-dev curl opensc softhsm2 openssl

.PHONY: setup apt venv build test check pytest demo bench clean

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

venv: $(VENV)/.deps-stamp

$(VENV)/.deps-stamp: pyproject.toml
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel "Cython>=3.0"
	@# pycurl from source against the system libcurl (design.md section 3): never the bundled
	@# wheel, whose own libcurl/OpenSSL crash inside hosts that link the system OpenSSL.
	$(PIP) install -q --no-binary pycurl --no-build-isolation -e ".[dev]"
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

clean:
	rm -rf build $(VENV) pkcs11ws/_native/core.c pkcs11ws/_native/core_api.h pkcs11ws/_native/*.so *.egg-info
