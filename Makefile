# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo audit test lint bench bench-paper clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned, only when none is importable: a bare range would pull a multi-GB CUDA build.
# pyradiomics (needed by frd-score) only builds without isolation, after numpy and versioneer.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/python -c "import radiomics" 2>/dev/null || \
	  ( $(BIN)/pip install -q numpy versioneer && $(BIN)/pip install -q --no-build-isolation pyradiomics )
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dpsynth demo --out runs/demo

# One-run privacy audit of the demo's DP-SGD recipe on simulated data (never private data).
audit: $(STAMP)
	@if [ -f runs/demo/ldm_dp/ledger.json ]; then \
	  $(BIN)/dpsynth audit-privacy runs/demo/ldm_dp --report runs/demo/report; \
	else \
	  echo "runs/demo absent (make demo builds it): auditing the demo preset's DP-SGD recipe into runs/audit"; \
	  $(BIN)/dpsynth audit-privacy --demo-recipe --out runs/audit; \
	fi

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

bench: $(STAMP)
	for b in simulate loading train dp_step evaluate; do $(BIN)/python benchmarks/bench_$$b.py; done

bench-paper: $(STAMP)
	$(BIN)/dpsynth sweep --epsilons 1,10,inf --pretrain both --out runs/bench-paper --bench-md BENCHMARKS.md

clean:
	rm -rf runs
