# Two entry points, both creating and reusing .venv:
#   make demo   set up the lab and run `normlab demo` on built-in data
#   make test   set up the dev extras and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build of 2.13.0 so a fresh machine never pulls a multi-GB CUDA wheel.
TORCH := torch==2.13.0

# The demo needs the lab extra only; the tests need the dev extras and the float64 kernels too.
$(VENV)/.lab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[lab]'
	# compile the kernels the demo calls (not the point-wise ones) into numba's disk cache once
	$(PY) -m normlab.core.cpu float32 --families nhwc,nchw,rows
	touch $@

$(VENV)/.dev: $(VENV)/.lab
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m normlab.core.cpu float32 float64
	touch $@

.PHONY: demo test bench
demo: $(VENV)/.lab
	$(VENV)/bin/normlab demo

test: $(VENV)/.dev
	$(PY) -m pytest -q -n 2

bench: $(VENV)/.lab
	$(VENV)/bin/normlab bench kernels --quick
