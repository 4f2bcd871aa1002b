# Two entry points for a fresh machine (README): `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

$(BIN)/activate: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $(BIN)/activate

setup: $(BIN)/activate

# The paper's headline on circles (Sec. 5.5): train DDPM + classifier, sample with multi-guidance, evaluate.
demo: setup
	$(BIN)/python train.py --data circles
	$(BIN)/python sample.py --lambdas 30,30

test: setup
	$(BIN)/python -m pytest -q -n auto --dist loadfile tests

bench: setup
	$(BIN)/python bench.py

.PHONY: setup demo test bench
