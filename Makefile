# mailgw: `make run` brings the gateway up in front of a demo Dovecot; `make test` runs
# the whole suite (what CI runs).  Both install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
TRIAL_ARGS ?= -j2 tests
# e.g. make run DEMO_ARGS='--run-dir /tmp/other-demo'
DEMO_ARGS ?=
DEMO_PACKAGES := dovecot-core dovecot-pop3d dovecot-imapd dovecot-submissiond curl python3-venv

.PHONY: deps demo-deps venv test run lint bench clean

deps:
	scripts/install-deps

demo-deps:
	scripts/install-deps $(DEMO_PACKAGES)

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# A green run removes its _trial_temp (hundreds of MB of mailboxes); a red one keeps
# it for the logs.  Nothing is printed after the summary line CI reads.
test: deps venv
	@status=0; $(PY) .ci/summary.py $(TRIAL_ARGS) || status=$$?; \
	if [ $$status -eq 0 ]; then $(PY) scripts/clean-trial-temp; fi; exit $$status

run: demo-deps venv
	$(PY) -m tests.servers.demo $(DEMO_ARGS)

lint: venv
	$(VENV)/bin/ruff check mailgw tests twisted bench
	$(VENV)/bin/mypy

# e.g. make bench BENCH_ARGS='--quick' (nginx and libnginx-mod-mail are installed if missing)
BENCH_ARGS ?=
bench: venv
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) _trial_temp* run
