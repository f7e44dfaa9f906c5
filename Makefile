# Two entry points for a fresh machine: `make sample` and `make test` (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SAMPLE_DIR ?= sample-digits
SAMPLE_OUT ?= sample-output

.PHONY: install browser sample test clean

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

# The report test drives Debian's headless chromium; installed here when we may (root + apt).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium is not installed: the browser test will be skipped"

test: install browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) $(SAMPLE_DIR) $(SAMPLE_OUT)
