# nccli: `make demo` and `make test` set everything up from a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup bytecode demo test test-quick lint bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull several GB of CUDA wheels
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# compile nccli's modules once (only changed files are recompiled): an editable install
# leaves them as sources, and where PYTHONDONTWRITEBYTECODE is set every command would
# compile all of them again (~0.25 s of each start-up)
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q nccli

demo: $(STAMP) bytecode
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check nccli tests benchmarks scripts
	$(BIN)/ruff format --check nccli tests benchmarks scripts

test: $(STAMP) bytecode lint
	$(BIN)/python -m pytest -q

test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP) bytecode
	$(BIN)/python benchmarks/bench_measure.py
	$(BIN)/python benchmarks/bench_extract.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
