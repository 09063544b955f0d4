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

demo: $(BIN)/.installed
	$(BIN)/bigbatch train configs/demo.toml --resume --set data.path=$(DATA) --set run.name=demo-lenet5-sgd-$(basename $(notdir $(DATA)))

test: $(BIN)/.installed
	$(BIN)/pytest

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_trainer.py

clean:
	rm -rf runs .cache
