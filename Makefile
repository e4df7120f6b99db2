# Two entry points, both safe to run again:
#   make up    - install what is needed, then run the whole pipeline locally
#   make test  - install what is needed, then run lint and every test
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := libpmem1 victoria-metrics docker.io debootstrap
UP_ARGS ?= --simulate 20

.PHONY: up test lint bench apt venv clean

# Debian packages the tests and the pmem backend use. Installed only when missing.
.stamp-apt: Makefile
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

apt: .stamp-apt

$(VENV)/.stamp-install: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.stamp-install

up: venv apt
	$(VENV)/bin/iotpipe up $(UP_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

test: venv apt lint
	$(VENV)/bin/python -m pytest -m "not e2e" $(PYTEST_ARGS)
	$(VENV)/bin/python -m pytest tests/e2e $(PYTEST_ARGS) || [ $$? = 5 ]

bench: venv apt
	$(VENV)/bin/iotpipe bench queue --json

clean:
	rm -rf $(VENV) .stamp-apt .pytest_cache .ruff_cache
