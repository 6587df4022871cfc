# `make run` and `make test` work on a fresh machine with Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint unit clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The modules setup.py compiles with mypyc (pyproject.toml, [tool.mxspool] compiled): a change to
# one rebuilds, since its compiled form shadows the .py.
COMPILED := $(shell sed -n '/^compiled = \[/,/^\]/p' pyproject.toml | grep -o 'src/[^"]*')

$(STAMP): pyproject.toml setup.py src/mxspool/smtp/_scan.c src/mxspool/store/_groupcommit.c \
		src/mxspool/store/_coalesce.c src/mxspool/store/_coalesce.h $(COMPILED) | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,fast,postgres]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/mxspool serve

lint: $(STAMP)
	$(BIN)/ruff check src tests bench setup.py
	$(BIN)/ruff format --check src tests bench setup.py
	$(BIN)/mypy

# Then the SMTP core's and listener's tests once more with the compiled modules imported from
# their sources (tests/interpreted.py): the fallback of a build without a C compiler.
test: lint
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)
	MXSPOOL_INTERPRETED=1 $(BIN)/pytest -q -p no:cacheprovider tests/smtp tests/test_compiled.py

unit: $(STAMP)
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/accept.py

clean:
	rm -rf $(VENV) mxspool-data .mypy_cache .ruff_cache
