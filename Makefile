# Two commands on a fresh machine: `make run` (the daily refresh end to end on the embedded
# stack with sample data) and `make test`. Both create the virtualenv themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_HOME ?= $(CURDIR)/.local/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DBT_SEND_ANONYMOUS_USAGE_STATS ?= false

.PHONY: install run api browser test test-fast test-faults lint check-dbt format docs bench clean stack-up stack-down

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	# Bytecode compiled once here: uv does not by default, and where PYTHONDONTWRITEBYTECODE is
	# set every process (each `refresh` command, Prefect server, test worker) would compile
	# Prefect's and dbt's modules from source again, seconds of CPU each.
	$(BIN)/uv pip install --python $(BIN)/python --quiet --compile-bytecode -e '.[local,dev,bigquery-dbt,bench,dask]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)  ## the daily refresh, end to end, on embedded Postgres + the BigQuery emulator
	$(BIN)/refresh demo

api: $(STAMP)  ## the API and dashboard on 127.0.0.1:8000, reads without a token (local demo)
	REFRESH_API_ANONYMOUS_READ=true $(BIN)/refresh api --host 127.0.0.1

# The dashboard test drives a real headless Chromium; a fresh CI machine gets it from apt.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

# Test modules are dealt to TEST_WORKERS processes (pytest-xdist), each with its own embedded
# Postgres, emulator, Prefect server and state directory (tests/conftest.py); the slowest
# modules go first (SLOW_MODULES there). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
PYTEST_WORKERS = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Tests that time how fast a process exits run after the others, alone on the machine: beside
# another worker's dbt build their seconds measure the neighbour, not the product.
SOLO_TESTS = tests/integration/test_concurrent_starts.py

test: $(STAMP) browser  ## the whole suite against real Postgres, the emulator, dbt and Prefect
	@start=$$(date +%s); $(BIN)/pytest $(PYTEST_WORKERS) $(addprefix --ignore=,$(SOLO_TESTS)) && \
		$(BIN)/pytest $(SOLO_TESTS); rc=$$?; \
		echo "make test: $$(( $$(date +%s) - start )) s wall time"; exit $$rc

# The fault-injection harness (docs/faults.md), left out of `make test`: BigQuery calls failing
# at a rate, COPY refused, Postgres restarted, triggers together, FAULT_TRIALS kill -9 trials.
FAULT_TRIALS ?= 25
test-faults: $(STAMP)  ## the fault-injection harness; FAULT_TRIALS=25 kill -9 trials by default
	@start=$$(date +%s); FAULT_TRIALS=$(FAULT_TRIALS) $(BIN)/pytest -m faults -rP; rc=$$?; \
		echo "make test-faults: $$(( $$(date +%s) - start )) s wall time"; exit $$rc

test-fast: $(STAMP)  ## unit tests only
	$(BIN)/pytest -m "not integration"

lint: $(STAMP)  ## ruff, format, mypy, the import contracts, sqlfluff
	$(BIN)/ruff check flows tests bench scripts
	$(BIN)/ruff format --check flows tests bench scripts
	$(BIN)/mypy flows
	$(BIN)/lint-imports  # layers and no import cycles ([tool.importlinter] in pyproject.toml)
	$(BIN)/python scripts/lint_sql.py models macros tests/dbt

check-dbt: $(STAMP)  ## the models compile for BigQuery (emulator) and every node is documented
	$(BIN)/python scripts/check_bigquery_target.py
	$(BIN)/python scripts/check_dbt_docs.py

bench: $(STAMP)  ## benchmarks (figures in docs/benchmarks.md)
	$(BIN)/python bench/generate_sample.py
	$(BIN)/python bench/load_throughput.py
	$(BIN)/python bench/incremental_scaling.py
	$(BIN)/python bench/webhooks.py
	$(BIN)/python bench/validate.py
	$(BIN)/python bench/api_latency.py
	$(BIN)/python bench/emulator_memory.py
	$(BIN)/python bench/bloat.py
	$(BIN)/python bench/end_to_end.py --rows 1000000
	$(BIN)/python bench/end_to_end.py --rows 10000000
	$(BIN)/python bench/scale_out.py

format: $(STAMP)
	$(BIN)/ruff format flows tests bench scripts
	$(BIN)/ruff check --fix flows tests bench scripts

docs: $(STAMP)
	$(BIN)/refresh docs

stack-up: $(STAMP)
	$(BIN)/refresh stack up

stack-down: $(STAMP)
	$(BIN)/refresh stack down

clean:
	-$(BIN)/refresh stack down
	rm -rf .local target logs
