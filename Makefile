# Two entry points for a fresh machine: `make sample` and `make test` (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SAMPLE_DIR ?= sample-digits
SAMPLE_OUT ?= sample-output

.PHONY: install sample test clean

$(BIN)/imgclust: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a CPU build; an unpinned torch would pull several GB of CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/imgclust

sample: install
	rm -rf $(SAMPLE_DIR)
	$(BIN)/imgclust sample $(SAMPLE_DIR)
	$(BIN)/imgclust run $(SAMPLE_DIR) $(SAMPLE_OUT) --n-clusters 10 --seed 0 --overwrite
	$(BIN)/imgclust evaluate $(SAMPLE_OUT) --labels parent-folder

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) $(SAMPLE_DIR) $(SAMPLE_OUT)
