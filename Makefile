# `make test` / `make lint` / `make demo` set up .venv on first use (or when pyproject.toml changes), then run.
# The test and demo extras include the train extra: .venv holds everything the tests and the demo import.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: test test-static test-demo test-gpu lint demo clean gpu-wheels gpu-proof

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,demo]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

test-static: $(STAMP)  # every kernel compiled for sm_90 at the benchmark shapes, held to its budgets (CI runs it)
	$(PY) -m pytest -q -m static

test-demo: $(STAMP)  # acceptance runs that train the demo model for minutes on CPU (CI runs it)
	$(PY) -m pytest -q -m demo

test-gpu: $(STAMP)  # on a CUDA machine: the compiled kernels and DALI on the GPU
	$(PY) -m pytest -q -m gpu

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(VENV)/bin/dinotron demo --config configs/demo.yaml --out runs/demo

# The bare GPU machine (README "Benchmarks on a GPU") lacks pytest, hypothesis, lightly (the tests' oracles) and a few
# pure-Python train dependencies: `make gpu-wheels` downloads them here for Python 3.12 into .gpuwheels/ (ignored).
GPU_WHEELS = pytest==8.4.2 pluggy iniconfig packaging pygments hypothesis==6.170.17 sortedcontainers lightly==1.6.0 \
             tqdm pyyaml braceexpand
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
		-d .gpuwheels $(GPU_WHEELS)

# On the GPU machine, with its own python3 and torch (no venv): every GPU test and benchmark, <= 8 minutes.
gpu-proof:
	$(PYTHON) benchmarks/gpu_proof.py --out $(or $(OUT),gpu-proof)

clean:
	rm -rf $(VENV) build dist *.egg-info
