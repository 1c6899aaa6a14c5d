# Every target sets up its own virtualenv (.venv) with the CPU build of torch first, so nothing pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test quickstart lint clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/.installed

test: setup
	$(BIN)/python -m pytest

quickstart: setup
	$(BIN)/python examples/quickstart.py

lint: setup
	$(BIN)/ruff check peft_ila tests examples

clean:
	rm -rf $(VENV) *.egg-info
