# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo lint test bench clean

setup: $(STAMP)

# (Re)install when the project's metadata changes; the package is installed editable.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lipfarm demo --out out/demo.mp4

lint: $(STAMP)
	$(BIN)/ruff check lipfarm common job worker scheduler api client cli benchmarks demo tests

test: lint
	$(BIN)/python -m pytest

# The README's figures: local fp32/OpenVINO/bf16, the farm at 1 and 2 workers, time to first
# playable segment, long-form memory, recovery times.
bench: $(STAMP)
	$(BIN)/lipfarm bench --json out/bench.json --chart out/bench.png \
		--precisions fp32,openvino:fp32,openvino:bf16 --farm --memory --recovery

clean:
	rm -rf out .pytest_cache
