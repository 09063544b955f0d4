# All set-up happens here: `make demo` and `make test` work on a fresh clone with no network
# beyond the package registry.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DATA ?= ../shared/data/cifar10-jpeg.zip
# The CPU build of torch that lies on the development machine's disk; pyproject allows >=2.13,<3.
TORCH ?= torch==2.13.0

.PHONY: demo dist-demo test lint format bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,lint]'
	touch $@

# The paper's 8-run grid for 5 epochs (two runs at a time), then its report.
demo: $(BIN)/.installed
	$(BIN)/bigbatch reproduce configs/quick.toml --jobs 2 --set data.path=$(DATA) \
		--output-dir runs/quick-$(basename $(basename $(notdir $(DATA))))

# Two data-parallel processes (gloo, one thread each) training LeNet-5 at batch 2048 with K-FAC.
dist-demo: $(BIN)/.installed
	$(BIN)/torchrun --nproc_per_node=2 -m bigbatch train configs/demo.toml --resume \
		--set data.path=$(DATA) --set runtime.threads=1 --set train.batch_size=2048 \
		--set optimizer.name=kfac --set optimizer.lr=0.004 \
		--set run.name=dist-demo-$(basename $(basename $(notdir $(DATA))))

# Formatting, lint and types; CI runs this before the tests.
lint: $(BIN)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(BIN)/.installed
	BIGBATCH_CIFAR10=$(abspath $(DATA)) $(BIN)/pytest

# Every table of BENCHMARKS.md (ASDL is installed for the K-FAC comparison); with
# BASELINE_SRC=/path/to/old/checkout/src also the old-vs-new comparison of compare_commits.py.
bench: $(BIN)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(BIN)/python benchmarks/bench_trainer.py --data $(DATA)
	$(BIN)/python benchmarks/bench_kfac.py --data $(DATA)
	$(BIN)/python benchmarks/bench_analysis.py --data $(DATA)
	$(BIN)/python benchmarks/bench_distributed.py
	$(BIN)/python benchmarks/project_scaling.py
	$(if $(BASELINE_SRC),$(BIN)/python benchmarks/compare_commits.py --baseline-src $(BASELINE_SRC) --data $(DATA))

clean:
	rm -rf runs .cache
