# `make demo` and `make test` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Machines of this project keep the CPU build of torch here; elsewhere pip finds torch on PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

.PHONY: demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(FIND_LINKS) -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m jobs.restore --config configs/local.yaml

test: $(BIN)/.installed
	$(BIN)/python -m pytest -n 2

lint: $(BIN)/.installed
	$(BIN)/ruff check pipeline jobs tests infra

clean:
	rm -rf $(VENV) out
