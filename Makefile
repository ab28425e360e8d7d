# Every target sets itself up: a virtual environment in .venv with the CPU build of torch (from the
# local wheel when there is one; see README) and the project installed in editable mode.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test test-fast bench clean

$(VENV)/.ready: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so nothing later resolves "torch" to a multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.ready
	$(PY) -m omni_compile.zoo.demo

test: $(VENV)/.ready
	$(PY) -m pytest -q tests

test-fast: $(VENV)/.ready
	$(PY) -m pytest -q -m "not slow" tests

bench: $(VENV)/.ready
	$(PY) -m omni_compile.bench --out out/bench

clean:
	rm -rf $(VENV) out
