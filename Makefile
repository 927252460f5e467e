# Two commands on a fresh machine: `make run` (demo) and `make test` (the suite). Both create the venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STELLA := $(VENV)/bin/stella-search
# faiss-gpu where nvidia-smi sees a GPU, faiss-cpu otherwise: never both (they install the same module).
FAISS_EXTRA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
DEMO_DATA ?= data
PORT ?= 8000
# DEMO_FLAGS=--exit stops the server after the sample queries

# Models load from local folders only (the embedded MiniLM ships in a package); nothing waits on a hub.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU wheel; a looser request would pull GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(FAISS_EXTRA),dev,ray]"
	touch $@

install: $(VENV)/.installed

# two workers, each taking whole test files (module fixtures such as a Ray cluster start once); TEST_WORKERS=0 runs
# the suite in one process
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

lint: install
	$(VENV)/bin/ruff check indexer search_api storage scripts tests

run: install
	$(STELLA) ingest scripts/sample_data/dbpedia_sample.jsonl --data-dir $(DEMO_DATA) --model minilm
	$(PY) scripts/demo.py --data-dir $(DEMO_DATA) --port $(PORT) $(DEMO_FLAGS)

clean:
	rm -rf $(VENV) $(DEMO_DATA) .pytest_cache
