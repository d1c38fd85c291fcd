# Targets run inside the README's virtualenv (.venv); `make install` creates it.
VENV   ?= .venv
BIN    := $(VENV)/bin
TINY   ?= tiny-models
KIND   ?= guided
PARAMS ?= examples/guided_tiny.json
OUT    ?= out/$(KIND)
DEVICE ?= cpu

.PHONY: install run test lint format bench tiny

install:
	python3.11 -m venv $(VENV) && . $(BIN)/activate && pip install torch==2.14.1 torchvision==0.29.1 && pip install -e '.[core,dev]'

tiny:
	$(BIN)/digin make-tiny-models $(TINY)

run: tiny
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
	$(BIN)/python bench/core.py --models $(TINY)
