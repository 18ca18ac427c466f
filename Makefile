# Two commands from a fresh clone: `make demo` (the main job) and `make test`.
# Each creates .venv if missing and installs the CPU torch wheel first where no GPU is present,
# so a bare `torch` requirement never pulls a multi-GB CUDA build by accident.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.archbench-installed
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test lint bench report validate venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU present: installing torch from the default index"; \
		$(BIN)/python -m pip install -q "torch>=2.4"; \
	else \
		echo "no GPU: installing the CPU torch wheel ($(TORCH_CPU))"; \
		$(BIN)/python -m pip install -q "$(TORCH_CPU)"; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev,eval,peers,data,scale]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/archbench compare

test: $(STAMP)
	$(BIN)/pytest -q -m "not gpu"

lint: $(STAMP)
	$(BIN)/ruff check archbench archs train evaluate tests scripts

bench: $(STAMP)
	$(BIN)/archbench bench arch=transformer,gpt2 bench=cpu_smoke bench.peers=true -m

validate: $(STAMP)
	$(BIN)/archbench validate

report: $(STAMP)
	$(BIN)/archbench report multirun runs -o reports/latest

clean:
	rm -rf $(VENV) runs multirun reports/latest
