PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The tests also compile for TPU topologies: libtpu (the tpu extra, ~700 MB) for them only.
TPU_STAMP := $(VENV)/.installed-tpu
# ...and run the optional integrations instead of skipping them (conftest.py fails a skip): W&B
# offline (wandb extra), lm-evaluation-harness on a local task (lm_eval extra), and the
# transformers parity test (hf extra) on torch's CPU build, pinned and installed first so pip
# never pulls a multi-GB CUDA build. `make install`/`make train` install none of this.
TEST_STAMP := $(VENV)/.installed-test
TORCH_CPU := torch==2.13.0+cpu
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TEST_EXTRAS := dev,tpu,hf,wandb,lm_eval

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

$(TEST_STAMP): $(TPU_STAMP) Makefile
	$(BIN)/pip install --quiet --no-deps '$(TORCH_CPU)' --extra-index-url $(TORCH_CPU_INDEX)
	$(BIN)/pip install --quiet -e '.[$(TEST_EXTRAS)]'
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	JAX_PLATFORMS=cpu LIME_JAX_REQUIRE_INTEGRATIONS=1 $(BIN)/python -m pytest -n 2 --dist loadfile -q

# The embedded default job: LIMe vs baseline on the embedded corpus (CPU, ~5 min), then a plot;
# through the lime-jax script, so with its malloc setting (cli/launch.py).
train: install
	JAX_PLATFORMS=cpu $(BIN)/lime-jax train --default

bench: install
	JAX_PLATFORMS=cpu $(BIN)/lime-jax bench --depths 8,16,32,64,128 --json runs/bench.json

clean:
	rm -rf $(VENV) runs .pytest_cache
