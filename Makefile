# Two entry points for a fresh machine: `make serve` and `make test`. Both create .venv and install idempotently.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
CONFIG ?= configs/serve-default.yaml
# LoRA folder of the default config (configs/serve-default.yaml); a missing folder is an empty library
SDSERVE_LORA_DIR ?= ./loras
export SDSERVE_LORA_DIR

.PHONY: install serve test test-fast gpuhost clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned: the CPU build on machines that carry it locally, and an already-installed torch is kept.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/sdserve serve $(CONFIG) --host $(HOST) --port $(PORT)

test: install
	bash .ci/ensure-redis && bash .ci/ensure-chromium
	PYTHONFAULTHANDLER=1 $(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest tests -m "not integration and not slow" $(PYTEST_ARGS)

gpuhost:
	bash ../shared/gpu-host/make-bundle.sh .gpuhost

clean:
	rm -rf $(VENV) .pytest_cache
