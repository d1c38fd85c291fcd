# Targets run inside the README's virtualenv (.venv); `make install` creates it.
VENV   ?= .venv
BIN    := $(VENV)/bin
TINY   ?= tiny-models
KIND   ?= guided
PARAMS ?= examples/guided_digits.json
OUT    ?= out/$(KIND)
DEVICE ?= cpu

ZOO    ?= core/zoo

.PHONY: install run test lint format bench bench-zoo tiny zoo

install:
	python3.11 -m venv $(VENV) && . $(BIN)/activate && pip install torch==2.14.1 torchvision==0.29.1 && pip install -e '.[core,dev]'

tiny:
	$(BIN)/digin make-tiny-models $(TINY)

# Retrain the bundled digits zoo from fixed seeds (about 25 min on 2 cores); options of the
# command (planted patch, correlated class, rates): python -m core.digits.train --help
zoo:
	$(BIN)/python -m core.digits.train --out $(ZOO)

run:
	$(BIN)/digin run $(KIND) --params $(PARAMS) --out $(OUT) --device $(DEVICE)

test:
	$(BIN)/pytest -q

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: tiny
	$(BIN)/python bench/guidance.py --models $(TINY)

bench-zoo:
	$(BIN)/python bench/zoo.py --zoo $(ZOO)
