# One command sets up and runs the demo, one sets up and runs the tests. Set-up is idempotent.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,deepspeed,tracking,structured,eval,clean,ray,quant,dev,docs
# Bounded torch so pip takes the local CPU wheel instead of a multi-GB CUDA build.
TORCH_SPEC ?= torch>=2.6,<2.14
STAMP := $(VENV)/.installed-$(shell echo "$(EXTRAS) $(TORCH_SPEC)" | cksum | cut -d' ' -f1)

.PHONY: setup demo test test-fast lint format docs bench clean

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

test: setup lint docs
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

# ruff lint and format (configured in pyproject.toml); `make format` applies them.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The docs site under docs/ (site/ is the output); --strict turns broken links and missing pages into errors.
# The recipe reference page is generated from the pydantic schema during the build (docs/hooks/recipe_reference.py).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf runs .pytest_cache site
