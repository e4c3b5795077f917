# One command sets up and runs the demo, one sets up and runs the tests. Set-up is idempotent.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,deepspeed,ray,dev
# Bounded torch so pip takes the local CPU wheel instead of a multi-GB CUDA build.
TORCH_SPEC ?= torch>=2.6,<2.14
STAMP := $(VENV)/.installed-$(shell echo "$(EXTRAS) $(TORCH_SPEC)" | cksum | cut -d' ' -f1)

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-*
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/fastserve run recipes/quickstart.yaml

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf runs .pytest_cache
