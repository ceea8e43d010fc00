# `make test` and the other targets create .venv on first use and install what they need.
# TORCH: the CPU wheel pinned for this project's machines; override it for a CUDA machine (e.g. TORCH=torch).
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.drivekd-installed

.PHONY: install java test lint demo demo-quick bench-capture bench-capture-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The DriveLM language metrics (pycocoevalcap's PTB tokenizer) need Java; installed here when missing and root.
java:
	@command -v java >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq default-jre-headless; } || { echo "Java is missing: apt-get install -y default-jre-headless (the DriveLM language metrics need it)"; exit 1; }

test: $(STAMP) java
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -q

# The paper's experiment in miniature on CPU (about 10 minutes on 2 cores); report in runs/demo/report/.
# Rerunning resumes the same folder; `make clean` (or another OUT) starts afresh.
demo: $(STAMP)
	$(VENV)/bin/drivekd demo --out runs/demo

demo-quick: $(STAMP)
	$(VENV)/bin/drivekd demo --quick --out runs/demo-quick

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

bench-capture: $(STAMP)
	$(VENV)/bin/drivekd bench capture --json runs/bench-capture.json

bench-capture-quick: $(STAMP)
	$(VENV)/bin/drivekd bench capture --quick --json runs/bench-capture-quick.json

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
