# Targets run inside the README's virtualenv (.venv); `make install` creates it.
VENV   ?= .venv
BIN    := $(VENV)/bin
TINY   ?= tiny-models
KIND   ?= guided
PARAMS ?= examples/guided_digits.json
OUT    ?= out/$(KIND)
DEVICE ?= cpu

ZOO    ?= core/zoo

.PHONY: install constraints run test lint format bench bench-zoo tiny zoo gpu-wheels gpu-smoke

install:
	python3.11 -m venv $(VENV) && . $(BIN)/activate && pip install -c constraints.txt torch==2.14.1 torchvision==0.29.1 && pip install -c constraints.txt -e ./client -e '.[core,dev]'

# Every dependency pinned (constraints.txt), resolved by pip-tools' pip-compile from both
# pyproject files for CPython 3.11 on x86-64 Linux; rerun after changing a dependency. The
# client is built first so that the resolver finds `digin-client` (which stays unpinned: it is
# installed from ./client).
constraints:
	rm -rf build/client-wheel && $(BIN)/pip wheel --quiet --no-deps ./client -w build/client-wheel
	$(BIN)/pip-compile --quiet --extra core --extra dev --strip-extras --no-emit-index-url \
		--no-emit-find-links --no-header --find-links build/client-wheel \
		--unsafe-package digin-client -o constraints.txt pyproject.toml client/pyproject.toml

tiny:
	$(BIN)/digin make-tiny-models $(TINY)

# Retrain the bundled digits zoo from fixed seeds (about 25 min on 2 cores); options of the
# command (planted patch, correlated class, rates): python -m digin.core.digits.train --help
zoo:
	$(BIN)/python -m digin.core.digits.train --out $(ZOO)

run:
	$(BIN)/digin run $(KIND) --params $(PARAMS) --out $(OUT) --device $(DEVICE)

test:
	$(BIN)/pytest -q -n 2

# The same lint as CI (.ci/run) and the pre-commit hooks: ruff, ruff format, mypy over the installed
# names (strict on the service packages and the client, a clean relaxed run on core/).
lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tools/typecheck.py

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: tiny
	$(BIN)/python bench/guidance.py --models $(TINY)

bench-zoo:
	$(BIN)/python bench/zoo.py --zoo $(ZOO)

# The GPU benchmark for a bare GPU machine (bench/gpu_run.sh): the wheels it lacks there, for
# CPython 3.12 on x86-64 Linux, into .whl/ (ignored; carried with the source tree).
WHEELS ?= .whl
gpu-wheels:
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(WHEELS) -r bench/gpu-wheels.txt

# The same run on this CPU at toy sizes, in a Python 3.12 virtualenv that holds what the GPU
# image holds (its torch 2.11 and libraries, no diffusers or pydantic): checks that everything
# the GPU run imports works there (full-size SD 1.5 and SDXL at 64 px: about half an hour on 2
# cores). Needs pyenv's Python 3.12 and about 5 GB for torch.
VENV_GPU ?= .venv-gpu312
PY312    ?= $(shell ls -d $$HOME/.pyenv/versions/3.12*/bin/python3 2>/dev/null | tail -1)
$(VENV_GPU)/bin/python:
	$(PY312) -m venv $(VENV_GPU)
	PIP_CONSTRAINT= $(VENV_GPU)/bin/pip install -r bench/gpu-image.txt
	$(VENV_GPU)/bin/pip uninstall -y pydantic pydantic-core annotated-types typing-inspection \
		diffusers importlib-metadata
gpu-smoke: gpu-wheels $(VENV_GPU)/bin/python
	PYTHON=$(VENV_GPU)/bin/python DIGIN_GPU_SITE=$$(mktemp -d) bash bench/gpu_run.sh out/gpu-smoke --smoke
