# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MLFLOW_VENV ?= .mlflow-venv
PIP_FLAGS ?= -q --disable-pip-version-check
STEPS ?= 300
PYTEST_ARGS ?=

.PHONY: demo test bench install install-dev mlflow-env clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) --upgrade pip

install: $(PY)
	$(PIP) install $(PIP_FLAGS) -c constraints.txt -e '.[tensorboard]'

install-dev: $(PY)
	$(PIP) install $(PIP_FLAGS) -c constraints.txt -e '.[dev]'

# mlflow is about 800 MB and pins what it likes: it lives in a virtualenv of its own,
# and the tests start its server from there (EVENTBUS_MLFLOW_BIN).
$(MLFLOW_VENV)/bin/mlflow:
	$(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip install $(PIP_FLAGS) --upgrade pip
	$(MLFLOW_VENV)/bin/python -m pip install $(PIP_FLAGS) 'mlflow>=2.14'

mlflow-env: $(MLFLOW_VENV)/bin/mlflow

# The main job: a real training run logging to local TensorBoard files and JSON lines.
demo: install
	$(VENV)/bin/eventbus train --output-dir runs/demo --max-steps $(STEPS)

test: install-dev mlflow-env
	EVENTBUS_MLFLOW_BIN=$(abspath $(MLFLOW_VENV))/bin/mlflow $(PY) -m pytest $(PYTEST_ARGS)

bench: install-dev
	$(PY) benchmarks/publish.py
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) $(MLFLOW_VENV) runs .pytest_cache build dist src/*.egg-info
