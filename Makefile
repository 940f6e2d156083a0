# Two commands on a fresh machine: `make tutorial` and `make test`.
# Both create .venv with the pinned requirements first (a no-op once it is up to date).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Torch is pinned apart from requirements.txt so that Colab/Kaggle keep their own CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup tutorial test lab bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

tutorial: setup
	$(PY) -m utils.notebook_runner

test: setup
	$(PY) -m pytest -q tests

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=.

bench: setup
	$(PY) bench/prepare_data.py

clean:
	rm -rf runs data/processed
