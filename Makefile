# One-command set-up: `make train` and `make test` create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test train lint bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The local CPU build of torch must come before transformers, or pip fetches a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[torch,dev]'
	# Real labelled images for the data tests and the Fashion-MNIST benchmark (Debian package).
	test -d /usr/share/datasets/fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2

# The default job: the tiny CPU recipe on the built-in synthetic dataset (about 10 minutes on 2 cores).
train: $(STAMP)
	$(VENV)/bin/dinov3-jax train $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_forward.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
