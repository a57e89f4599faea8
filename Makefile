# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOURCES := $(shell find dsage twisted -name '*.py' -o -name '*.pov' 2>/dev/null)

.PHONY: install test unit e2e demo bench clean

$(STAMP): setup.cfg pyproject.toml $(SOURCES)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

e2e: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/e2e

demo: $(STAMP)
	$(BIN)/dsage demo --workers 2

clean:
	rm -rf $(VENV) build *.egg-info
