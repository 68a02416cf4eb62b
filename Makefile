# mailgw: `make run` brings the gateway up in front of a demo Dovecot; `make test` runs
# the whole suite (what CI runs).  Both install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
TRIAL_ARGS ?= -j2 tests

.PHONY: deps venv test run lint bench clean

deps:
	scripts/install-deps

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: deps venv
	$(PY) .ci/summary.py $(TRIAL_ARGS)

run: deps venv
	$(PY) -m tests.servers.demo

lint: venv
	$(VENV)/bin/ruff check mailgw tests twisted bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) _trial_temp* run
