# `make test` / `make lint` / `make demo` set up .venv on first use (or when pyproject.toml changes), then run.
# The test and demo extras include the train extra: .venv holds everything the tests and the demo import.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: test test-gpu lint demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,demo]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

test-gpu: $(STAMP)  # on a CUDA machine: the compiled kernels and DALI on the GPU
	$(PY) -m pytest -q -m gpu

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(VENV)/bin/dinotron demo --config configs/demo.yaml --out runs/demo

clean:
	rm -rf $(VENV) build dist *.egg-info
