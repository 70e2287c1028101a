# Two entry points, both creating and reusing .venv:
#   make demo   set up the lab and run `normlab demo` on built-in data
#   make test   set up the dev extras and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build of 2.13.0 so a fresh machine never pulls a multi-GB CUDA wheel.
TORCH := torch==2.13.0
# Installs go through uv (torch + the lab extra: ~10 s instead of pip's ~100 s on 2 cores), and
# through pip if uv cannot be installed or fails. uv does not read pip's configuration, so pip's
# local wheel folder (find-links: where this machine class keeps the CPU torch wheel) is passed on.
export UV_FIND_LINKS ?= $(shell echo $${PIP_FIND_LINKS:-$$($(PYTHON) -m pip config get global.find-links 2>/dev/null)})
# Python's bytecode cache lives under .venv and is written on first import, also where the
# environment sets PYTHONDONTWRITEBYTECODE (and uv installs no .pyc): otherwise every process
# (the CLI, each sweep worker, each test subprocess) recompiles torch's sources, ~4 s each here.
export PYTHONPYCACHEPREFIX := $(abspath $(VENV))/pycache
unexport PYTHONDONTWRITEBYTECODE
install = $(VENV)/bin/uv pip install -q --python $(PY) $(1) || $(PY) -m pip install -q $(1)

# The demo needs the lab extra only; the tests need the dev extras and the float64 kernels too.
$(VENV)/.lab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv || echo "uv could not be installed: using pip"
	$(call install,$(TORCH))
	$(call install,-e '.[lab]')
	# compile the kernels the demo calls (of the point-wise ones only DyT) into numba's disk cache once
	$(PY) -m normlab.core.cpu float32 --families nhwc,nchw,rows,dyt
	touch $@

$(VENV)/.dev: $(VENV)/.lab
	$(call install,-e '.[dev]')
	$(PY) -m normlab.core.cpu float32 float64
	touch $@

.PHONY: demo test bench
demo: $(VENV)/.lab
	$(VENV)/bin/normlab demo

test: $(VENV)/.dev
	$(PY) -m pytest -q -n 2

bench: $(VENV)/.lab
	$(VENV)/bin/normlab bench kernels --quick
