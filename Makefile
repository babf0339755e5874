PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The tests also compile for TPU topologies: libtpu (the tpu extra, ~700 MB) for them only.
TPU_STAMP := $(VENV)/.installed-tpu

.PHONY: install test train bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(TPU_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,tpu]'
	touch $(TPU_STAMP)

test: $(TPU_STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -n 2 --dist loadfile -q

# The embedded default job: LIMe vs baseline on the embedded corpus (CPU, ~5 min), then a plot.
train: install
	JAX_PLATFORMS=cpu $(BIN)/python -m lime_jax.cli.default_run

bench: install
	JAX_PLATFORMS=cpu $(BIN)/lime-jax bench --depths 8,16,32,64,128 --json runs/bench.json

clean:
	rm -rf $(VENV) runs .pytest_cache
