# Two commands do everything: `make demo` and `make test`. Each creates the environment it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; on a CUDA machine set TORCH_SPEC to the build you want.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint env clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: a plain `torch` requirement would otherwise pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: env
	$(BIN)/sdtune demo

test: env
	$(BIN)/python -m pytest

lint: env
	$(BIN)/ruff check sdtune tests scripts
	$(BIN)/ruff format --check sdtune tests scripts

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache

# The wheels a bare GPU machine lacks (diffusers, a slimmed bitsandbytes), for its Python, in
# gpu-wheels/ (git-ignored; name it in what travels with the checkout). See CONTRIBUTING.md.
GPU_PYTHON ?= 3.12
.PHONY: gpu-wheels
gpu-wheels:
	$(PYTHON) scripts/gpu_wheels.py download --dest gpu-wheels --python-version $(GPU_PYTHON)
