# The two commands of the README:  make demo   and   make test
# Both create .venv on first use and install mtool into it (CPU torch first, so pip does not
# pull a multi-GB CUDA build on machines that have the local CPU wheel).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mtool-installed
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: demo test install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mtool demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/bench_convert.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
