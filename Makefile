# Two entry points: `make demo` and `make test`. Both create and reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# One thread per process: two cores are shared by pytest workers and data-loader workers.
export OMP_NUM_THREADS ?= 1
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-all venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

# The demo is one training process at a time: give it every core (`nproc` itself honours the exported
# OMP_NUM_THREADS=1 above, so it is asked without it).
demo: $(STAMP)
	OMP_NUM_THREADS=$$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) $(PY) -m mm_llama.demo runs/demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=10

test-all: $(STAMP)
	$(PY) -m pytest -n 2 -m '' --durations=10

clean:
	rm -rf runs/demo data/demo test-artifacts
