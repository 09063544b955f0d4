# All set-up happens here: `make demo` and `make test` work on a fresh clone with no network
# beyond the package registry.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DATA ?= ../shared/data/cifar10-jpeg.zip

.PHONY: demo dist-demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# The seed's 8-run grid for 5 epochs (two runs at a time), then its report.
demo: $(BIN)/.installed
	$(BIN)/bigbatch reproduce configs/quick.toml --jobs 2 --set data.path=$(DATA) \
		--output-dir runs/quick-$(basename $(basename $(notdir $(DATA))))

# Two data-parallel processes (gloo, one thread each) training LeNet-5 at batch 2048 with K-FAC.
dist-demo: $(BIN)/.installed
	$(BIN)/torchrun --nproc_per_node=2 -m bigbatch train configs/demo.toml --resume --set data.path=$(DATA) \
		--set runtime.threads=1 --set train.batch_size=2048 --set optimizer.name=kfac --set optimizer.lr=0.004 \
		--set run.name=dist-demo-$(basename $(basename $(notdir $(DATA))))

test: $(BIN)/.installed
	$(BIN)/pytest

# Every table of BENCHMARKS.md (about 40 minutes on 2 cores; ASDL is installed for the K-FAC comparison).
bench: $(BIN)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(BIN)/python benchmarks/bench_trainer.py
	$(BIN)/python benchmarks/bench_kfac.py
	$(BIN)/python benchmarks/bench_analysis.py
	$(BIN)/python benchmarks/bench_distributed.py
	$(BIN)/python benchmarks/project_scaling.py

clean:
	rm -rf runs .cache
