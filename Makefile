# MicroVerse: `make serve` and `make test` work on a fresh machine (CPU torch first when no CUDA).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 3000
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup serve test test-fast bench-overhead demo-model clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing the default (CUDA) torch build"; \
		$(PY) -m pip install -q "torch>=2.5"; \
		$(PY) -m pip install -q -e ".[dev,gpu]"; \
	else \
		echo "no CUDA: installing the CPU torch build $(TORCH_VERSION) first"; \
		$(PY) -m pip install -q "torch==$(TORCH_VERSION)"; \
		$(PY) -m pip install -q -e ".[dev]"; \
	fi
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/microverse serve --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench-overhead: $(STAMP)
	$(PY) -m microverse.tools.overhead_bench

demo-model: $(STAMP)  # train the demo model from scratch on simulator clips (about 45 min, 2 CPU cores)
	$(VENV)/bin/microverse train demo --out outputs/demo

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info

# Load test: capacity, then 2x capacity for LOAD_TEST_DURATION s against a service it starts; report in load_tests/reports/.
LOAD_TEST_DURATION ?= 300
# REPLICAS=2 starts two replicas on one PostgreSQL job store; REPLICAS=1,2 runs both and reports the throughput ratio.
REPLICAS ?= 1
.PHONY: load-test
load-test: $(STAMP)
	$(PY) -m load_tests.run --start-service --duration $(LOAD_TEST_DURATION) --replicas $(REPLICAS) --out load_tests/reports/$$(date +%Y%m%d-%H%M%S)
