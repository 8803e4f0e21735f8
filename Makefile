# Set-up and checks for batchrun. Two commands do everything on a fresh machine:
#   make demo   # .venv, install, run the sample input against the embedded mock provider
#   make test   # .venv with the test extras, then the whole suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean bench bench-smoke

$(BIN)/batchrun: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test-extras: $(BIN)/batchrun
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/batchrun
	$(BIN)/batchrun run sample_inputs/prompts.jsonl --out out.jsonl --provider mock --no-progress
	@echo "wrote out.jsonl ($$(wc -l < out.jsonl) lines)"

# Airflow 3 in a venv of its own (about 130 packages), for tests/test_airflow_dag.py.
AIRFLOW_VENV := .venv-airflow
$(AIRFLOW_VENV)/.installed:
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/pip install --quiet 'apache-airflow>=3.0,<4' apache-airflow-providers-standard
	touch $@

# The whole suite on the standard loop, then the in-process tests again on
# uvloop (the slow tests run the CLI, whose default loop is already uvloop).
test: $(VENV)/.test-extras $(AIRFLOW_VENV)/.installed
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q --loop uvloop -m "not slow"

# The SDK peers are optional: if they can't be installed, the table says "unavailable".
$(VENV)/.bench-extras: $(BIN)/batchrun
	$(BIN)/pip install --quiet -e '.[bench]' && touch $@ \
		|| echo "bench: could not install the bench extra; SDK peers will be unavailable"

# Several minutes: scenarios a-d of benchmarks/run.py; BENCH_ARGS="--skip-big --reps 5" etc.
bench: $(VENV)/.bench-extras
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

bench-smoke: $(BIN)/batchrun
	$(BIN)/python -m benchmarks.run --smoke

lint: $(VENV)/.test-extras
	$(BIN)/ruff check batchrun tests
	$(BIN)/ruff format --check batchrun tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) out.jsonl out.jsonl.batchrun .pytest_cache .mypy_cache .ruff_cache
