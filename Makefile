# The two commands of the README: `make run` and `make test`.  Everything they need is
# installed here: a virtualenv in .venv with the project and its extras, and the Debian
# packages the tests use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the test suite needs: Dovecot, the reference for differential tests;
# isync (mbsync) and offlineimap3, real sync clients run against the IMAP server;
# PostgreSQL, the provider's second storage (tests start throw-away clusters of it);
# swaks and msmtp, real SMTP clients for the MX, the submission port and the local SMTP.
TEST_DEBS := dovecot-imapd isync offlineimap3 postgresql swaks msmtp
RUN_HOME ?= .run/demo
RUN_PASSPHRASE ?= leapmail-demo
RUN_IMAP_PORT ?= 1984
RUN_SMTP_PORT ?= 2013
RUN_PROVIDER_HOME ?= .run/provider
RUN_PROVIDER_PORT ?= 4430

.PHONY: all test run bench docs clean debs

all: test

$(STAMP): setup.cfg setup.py pyproject.toml
	@# Debian's Python needs python3-venv for `-m venv` to work.
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) \
	    || { rm -rf $(VENV); tools/ensure-debian-packages python3-venv; $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[test,docs]'
	@# twistd finds plugins in twisted/plugins/ of any sys.path entry; an editable
	@# install does not copy ours there, so point sys.path at the source tree's copy.
	$(BIN)/python -c 'import sysconfig, os; open(os.path.join(sysconfig.get_paths()["purelib"], "leapmail-twistd-plugins.pth"), "w").write(os.path.abspath("twistd-plugins") + "\n")'
	touch $@

debs:
	@tools/ensure-debian-packages $(TEST_DEBS)

test: $(STAMP) debs
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	@for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

docs: $(STAMP)
	$(BIN)/sphinx-build -q -W --keep-going -b html docs docs/_build/html

run: $(STAMP)
	@RUN_HOME='$(RUN_HOME)' RUN_PASSPHRASE='$(RUN_PASSPHRASE)' RUN_IMAP_PORT='$(RUN_IMAP_PORT)' \
	    RUN_SMTP_PORT='$(RUN_SMTP_PORT)' RUN_PROVIDER_HOME='$(RUN_PROVIDER_HOME)' \
	    RUN_PROVIDER_PORT='$(RUN_PROVIDER_PORT)' BIN='$(BIN)' tools/run-demo

clean:
	rm -rf $(VENV) docs/_build .run .pytest_cache build *.egg-info
