# Two commands on a fresh machine: `make tutorial` and `make test`.
# Both create .venv with the pinned requirements first (a no-op once it is up to date).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Torch is pinned apart from requirements.txt so that Colab/Kaggle keep their own CUDA build. pip installs it, so
# that the machine's own pip settings (a local wheel, constraints) apply; uv installs the rest, much faster.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# JupyterLab refuses to start as root without --allow-root; root is the usual user on cloud GPU containers.
AS_ROOT  := $(if $(filter 0,$(shell id -u)),--allow-root)
LAB_ARGS ?=

.PHONY: setup tutorial test lint lab bench gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	@if $(PY) -m pip install --quiet --disable-pip-version-check uv==0.13.9; then \
		echo "installing the pinned packages with uv"; \
		$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) -r requirements.txt -r requirements-dev.txt; \
	else \
		echo "uv unavailable: installing the pinned packages with pip (a few minutes)"; \
		$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt; \
	fi
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

tutorial: setup
	$(PY) -m tools.notebook_runner

lint: setup
	$(VENV)/bin/ruff check utils tools bench tests notebooks
	$(VENV)/bin/ruff format --check utils tools bench tests notebooks

# glibc keeps freed memory instead of faulting it in again at each training step (tests/conftest.py says why)
test: lint
	GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=536870912 \
		$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=. $(AS_ROOT) $(LAB_ARGS)

bench: setup
	$(PY) bench/prepare_data.py

gpu-check: setup
	$(PY) bench/gpu_check.py

clean:
	rm -rf runs data/processed
