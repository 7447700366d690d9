# The two Quickstart commands (`make finetune`, `make test`) work from a fresh clone: they install what
# is missing, build the extension in place (incrementally), then run.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: deps build finetune demo test bench install clean

deps:
	$(PYTHON) -m pip install -q -r requirements.txt

build: deps
	mkdir -p build
	$(PYTHON) setup.py build_ext --inplace > build/build.log 2>&1 || { tail -60 build/build.log; exit 1; }
	grep "^lora_ext: building" build/build.log
	$(PYTHON) -c "import lora_ext; assert lora_ext.HAS_C, 'lora_ext._C did not load'"

finetune: build
	$(PYTHON) -m lora_ext finetune

demo: build
	$(PYTHON) -m lora_ext demo

test: build
	$(PYTHON) -m pytest -q tests

bench: build
	$(PYTHON) -m lora_ext bench --quick

install:
	$(PYTHON) -m pip install --no-build-isolation .

clean:
	rm -rf build lora_ext/_C*.so lora_ext/_build_config.py
