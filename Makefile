# All set-up happens here: `make demo` and `make test` work on a fresh clone with no network
# beyond the package registry.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DATA ?= ../shared/data/cifar10-jpeg.zip

.PHONY: demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# The seed's 8-run grid for 5 epochs (two runs at a time), then its report.
demo: $(BIN)/.installed
	$(BIN)/bigbatch reproduce configs/quick.toml --jobs 2 --set data.path=$(DATA) \
		--output-dir runs/quick-$(basename $(basename $(notdir $(DATA))))

test: $(BIN)/.installed
	$(BIN)/pytest

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_trainer.py
	$(BIN)/python benchmarks/bench_kfac.py

clean:
	rm -rf runs .cache
