# pymta — developer entry points.
#   make run    create .venv, an instance in ./run/ if missing, start master in the foreground
#   make test   install what the tests need, then run the whole suite
#   make bench  benchmarks against Postfix and Dovecot (never part of make test)

# Services run as mail_owner and must be able to execute the interpreter, so
# the venv is built on Debian's /usr/bin/python3 when there is one (a pyenv
# build under /root is out of reach of other accounts).
PYTHON     ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV       := .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
DEB_TEST   := swaks msmtp mpop isync fetchmail dnsmasq-base postfix fail2ban pflogsumm
PYTEST_ARGS ?=

.PHONY: run test bench venv test-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	@test -f run/etc/main.cf || $(VENV)/bin/pymta init run
	@echo "pymta: ports: smtp 2525, submission 2587 and 2465 (TLS), pop3 2110 and 2995 (TLS) on 127.0.0.1"
	@echo "pymta: first message, from another terminal:"
	@echo "  $(VENV)/bin/pymta -c run/etc user add you@$$($(VENV)/bin/postconf -c run/etc -h mydomain) <<< 'a password'"
	@echo "  echo 'Subject: hello' | $(VENV)/bin/sendmail -C run/etc you@$$($(VENV)/bin/postconf -c run/etc -h mydomain)"
	@echo "pymta: Ctrl-C stops it."
	$(VENV)/bin/pymta -c run/etc start --foreground

# As root (CI), install the real clients and servers the system tests drive,
# and the unprivileged mail_owner account the master drops to.
test-deps:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(DEB_TEST); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  fi; \
	  id pymta >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin pymta; \
	fi

test: $(STAMP) test-deps
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: $(STAMP) test-deps
	$(PY) -m tests.bench.run $(if $(QUICK),--quick,) $(if $(ONLY),--only $(ONLY),) $(if $(ROUNDS),--rounds $(ROUNDS),)

clean:
	rm -rf $(VENV) build *.egg-info
