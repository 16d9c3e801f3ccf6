# Two commands do everything: `make demo` and `make test`. Each creates the environment it needs,
# installing the exact versions of requirements.lock (the set the suite last passed with).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; on a CUDA machine set TORCH_SPEC to the build you want (same version).
TORCH_SPEC ?= torch==2.13.0
PIP_SPEC   ?= pip==26.3
LOCK   := requirements.lock

.PHONY: demo test lint env ui lock test-latest clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(PIP_SPEC)"
	# torch first: a plain `torch` requirement would otherwise pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[dev]"
	$(BIN)/python scripts/check_lock.py $(LOCK)
	touch $@

demo: env
	$(BIN)/sdtune demo

test: env
	$(BIN)/python -m pytest

# the web app on http://127.0.0.1:7860/, over the folder outputs/
ui: env
	$(BIN)/sdtune ui --workspace outputs

lint: env
	$(BIN)/ruff check sdtune tests scripts
	$(BIN)/ruff format --check sdtune tests scripts

# A fresh resolution of pyproject.toml's ranges (pip-tools, in a throwaway venv) written to the
# lock, then the suite on a fresh .venv built from it. Commit the lock only if the suite passes.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip pip-tools
	.lock-venv/bin/pip-compile --quiet --upgrade --extra dev --strip-extras --no-emit-index-url \
	    --no-emit-find-links --no-emit-trusted-host --upgrade-package "$(TORCH_SPEC)" \
	    --output-file $(LOCK) pyproject.toml
	# the lock names torch's version, not its build, so a CUDA build of it satisfies it too
	sed -i -E 's/^torch==([^+ ]+)\+[a-z0-9]+/torch==\1/' $(LOCK)
	rm -rf .lock-venv $(VENV)
	$(MAKE) test

# The newest release of every dependency, ignoring the lock and pyproject's upper bounds, in a
# throwaway venv; a short smoke path prints each break in one line. Not part of CI.
test-latest:
	rm -rf .latest-venv
	$(PYTHON) -m venv .latest-venv
	.latest-venv/bin/python -m pip install --quiet --upgrade pip
	.latest-venv/bin/python -m pip install --quiet $(TORCH_SPEC)
	.latest-venv/bin/python -m pip install --quiet -e ".[dev]"
	.latest-venv/bin/python scripts/smoke_latest.py --upgrade

clean:
	rm -rf $(VENV) .lock-venv .latest-venv outputs .pytest_cache .ruff_cache

# The wheels a bare GPU machine lacks (diffusers, a slimmed bitsandbytes), for its Python, in
# gpu-wheels/ (git-ignored; name it in what travels with the checkout). See CONTRIBUTING.md.
GPU_PYTHON ?= 3.12
.PHONY: gpu-wheels
gpu-wheels:
	$(PYTHON) scripts/gpu_wheels.py download --dest gpu-wheels --python-version $(GPU_PYTHON)
