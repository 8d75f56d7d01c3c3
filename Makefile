# The two commands a fresh clone needs: `make demo` and `make test`.
# Both create the virtual environment on first use (pip takes torch from the wheels
# on disk where they exist; see README).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint stop bench clean

# constraints.txt: the exact versions CI and the image run, inside pyproject.toml's ranges.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[stack,dev]'
	touch $(STAMP)

demo: $(STAMP)
	sh scripts/apt-deps.sh demo
	$(VENV)/bin/mmrag demo

# scripts/apt-deps.sh: the Debian packages tests need (as root it installs them; otherwise
# it prints the apt-get command and stops).
test: $(STAMP)
	sh scripts/apt-deps.sh
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

stop: $(STAMP)
	$(VENV)/bin/mmrag stack down

bench: $(STAMP)
	$(PY) bench/ingest.py
