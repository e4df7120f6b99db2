# Two entry points, both safe to run again:
#   make up    - install what is needed, then run the whole pipeline locally
#   make test  - install what is needed, then run lint and every test
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# libpmem1: the queue's pmem backend (optional at run time, tested in CI).
# victoria-metrics: a real TSDB sink for tests; docker.io + debootstrap: the image build test;
# chromium: the live page's browser tests (driven by Playwright, which downloads no browser).
APT_RUN := libpmem1
APT_TEST := $(APT_RUN) victoria-metrics docker.io debootstrap chromium
UP_ARGS ?= --simulate 20
# Python's headers build the queue's C record encoder at install time; Debian's python3.11
# keeps them in python3.11-dev (a pyenv or official-image Python has them already).
APT_BUILD := $(shell $(PYTHON) -c 'import os, sys, sysconfig; \
  print("" if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) \
  else "python%d.%d-dev" % sys.version_info[:2])' 2>/dev/null)

.PHONY: up test lint bench apt venv clean

# Debian packages, installed only when missing (the stamp re-checks when this file changes).
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@
endef

.stamp-apt-build: Makefile
	$(call apt_install,$(APT_BUILD))

.stamp-apt-run: Makefile
	$(call apt_install,$(APT_RUN))

.stamp-apt-test: Makefile
	$(call apt_install,$(APT_TEST))

apt: .stamp-apt-test

# The first install takes a minute or two: say so rather than sit silent. setuptools'
# warnings about its own experimental options are for us, not for someone running `make up`.
$(VENV)/.stamp-install: pyproject.toml workloads/iotpipe/queue/_framing.c workloads/iotpipe/middle/_hot.c \
		workloads/iotpipe/ingest/core/_frames.c workloads/iotpipe/_cinclude/msgpack_put.h \
		workloads/iotpipe/_cinclude/payload_run.h .stamp-apt-build
	@echo "setting up $(VENV): installing iotpipe and its dependencies (the first time takes a minute or two)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@PYTHONWARNINGS=ignore $(PY) -m pip install -q -e '.[test]'
	@echo "$(VENV) is ready"
	@touch $@

venv: $(VENV)/.stamp-install

up: venv .stamp-apt-run
	$(VENV)/bin/iotpipe up $(UP_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

test: venv .stamp-apt-test lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: venv .stamp-apt-run
	$(VENV)/bin/iotpipe bench queue --json

clean:
	rm -rf $(VENV) .stamp-apt-build .stamp-apt-run .stamp-apt-test .pytest_cache .ruff_cache
