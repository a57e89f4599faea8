# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOURCES := $(shell find dsage twisted -name '*.py' -o -name '*.pov' 2>/dev/null)

.PHONY: install system test unit e2e demo bench bench-dsage bench-scale chaos clean

$(STAMP): setup.cfg pyproject.toml $(SOURCES)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q '.[test]'
	touch $(STAMP)

install: $(STAMP)

# system: the examples' engines (GMP-ECM for DistributedFactor, POV-Ray for DistributedPOVRay),
# and for the tests PostgreSQL and libfaketime (a step of the machine's clock).
system:
	@missing=""; command -v ecm >/dev/null || missing="$$missing gmp-ecm"; \
	command -v povray >/dev/null || missing="$$missing povray"; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v faketime >/dev/null || missing="$$missing faketime"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: install$$missing (Debian packages) for the examples and the tests"; fi; \
	fi

test: system $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

e2e: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/e2e

# The peers' harness (../shared/bench/peers) runs in the same run where it is present.
bench: system $(STAMP)
	$(BIN)/python bench/dsage_bench.py --run-peers
	$(BIN)/python bench/apps.py

# dsage alone, beside the peers' last recorded figures (a few minutes).
bench-dsage: $(STAMP)
	$(BIN)/python bench/dsage_bench.py

# 1,000,000 jobs in the database, 1,000 worker slots, restarts, steady load.
bench-scale: $(STAMP)
	$(BIN)/python bench/scale.py

chaos: system $(STAMP)
	$(BIN)/python -m tests.support.chaos --rounds $${ROUNDS:-20} $${SEED:+--seed $$SEED} $${DB:+--db $$DB}

demo: system $(STAMP)
	$(BIN)/dsage demo --workers 2

clean:
	rm -rf $(VENV) build *.egg-info
