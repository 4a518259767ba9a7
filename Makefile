# Two commands on a fresh machine (README):
#   make demo   set up .venv and run the main job
#   make test   set up .venv and run the test suite (what .ci/run calls)
# TORCH_SPEC picks the torch wheel for the venv: the CPU build here; on a CUDA machine use
#   make test TORCH_SPEC=torch    (or any pip requirement string)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2 -q

.PHONY: venv demo test bench clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q pybind11 setuptools wheel
	$(PY) -m pip install -q --no-build-isolation -e '.[test,bench]'
	touch $@

venv: $(VENV)/.installed

# The main job: write the demo synthetic cohorts (NIfTI + DICOM), train CMML (pretrain +
# finetune) and CSF-Net at CPU-friendly sizes, print test metrics next to the generator's
# oracle; reports (Markdown + PNG) under runs/demo/. About 10 minutes on 2 CPU cores.
demo: venv
	$(PY) -m pip install -q --no-build-isolation --no-deps -e . >/dev/null
	$(PY) -m lungcore demo --out runs/demo

test: venv
	$(PY) -m pip install -q --no-build-isolation --no-deps -e . >/dev/null
	$(PY) -m pytest $(PYTEST_ARGS) tests

bench: venv
	$(PY) -m benchmarks.run

clean:
	rm -rf build *.egg-info lungcore/_C*.so runs .pytest_cache
