# Two commands are all a new user needs: `make book` and `make test`.
# Each does its own set-up into .venv, idempotently.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PARAMS ?= demo
# The book's models are small: one BLAS thread per process is faster than two on a 2-core CPU
# (measured 2-4x on the smoke notebooks). Override with `make book OMP_NUM_THREADS=8`.
OMP_NUM_THREADS ?= 1
export OMP_NUM_THREADS

.PHONY: book test test-fast bench clean help

help:
	@echo "make book   - execute the notebooks ($(PARAMS) parameters) and build the book into _build/html"
	@echo "make test   - run the test suite (fast + notebooks tiers; gpu tier skips without CUDA)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch through pip: it takes the local wheels (uv/poetry would download GBs of CUDA wheels)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[wsi,dev]'
	touch $(STAMP)

book: $(STAMP)
	$(PY) -m gimplib.book --params $(PARAMS)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not notebooks"

bench: $(STAMP)
	$(PY) -m gimplib.bench io
	$(PY) -m gimplib.bench step
	$(PY) -m gimplib.bench slide

clean:
	rm -rf _build .pytest_cache
