# Newcomer entry points: `make demo` and `make test`. Each builds .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench venv browser clean

$(STAMP): pyproject.toml requirements-lock.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build on CPU machines
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements-lock.txt
	# open_clip's tokenizer is a test oracle only: --no-deps keeps its vision dependencies out of this venv
	$(BIN)/python -m pip install -q --no-deps open_clip_torch==3.3.0
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/lorakit demo

# Debian's chromium for the GUI browser test: installed when missing and root, else one line saying what to install
browser:
	@bash scripts/ensure-chromium.sh

test: $(STAMP) browser
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/adapters.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
