# Two entry points, both safe to run again:
#   make up    - install what is needed, then run the whole pipeline locally
#   make test  - install what is needed, then run lint and every test
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# libpmem1: the queue's pmem backend (optional at run time, tested in CI).
# victoria-metrics: a real TSDB sink for tests; docker.io + debootstrap: the image build test.
APT_RUN := libpmem1
APT_TEST := $(APT_RUN) victoria-metrics docker.io debootstrap
UP_ARGS ?= --simulate 20

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

.stamp-apt-run: Makefile
	$(call apt_install,$(APT_RUN))

.stamp-apt-test: Makefile
	$(call apt_install,$(APT_TEST))

apt: .stamp-apt-test

$(VENV)/.stamp-install: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
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
	rm -rf $(VENV) .stamp-apt-run .stamp-apt-test .pytest_cache .ruff_cache
