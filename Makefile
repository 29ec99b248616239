# make demo  — set up .venv, build the custom ops, convert all-MiniLM-L6-v2 and print the report
# make test  — set up if needed and run the test suite
PY      := .venv/bin/python
PIP     := .venv/bin/pip
OPS_LIB := ort_ops/libmfconvert_ops.so
OPS_SRC := $(wildcard ort_ops/src/*.cc ort_ops/src/*.h) ort_ops/src/exports.map
TORCH   ?= torch==2.13.0

.PHONY: setup build demo test bench clean
setup: .venv/.installed $(OPS_LIB)

# The CPU build of torch is pinned first so that resolving the other dependencies never pulls a
# CUDA build; `pip install -e .` then builds the custom-op library (see setup.py).
.venv/.installed: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	touch $@

$(OPS_LIB): $(OPS_SRC) .venv/.installed
	$(PY) setup.py -q build_ext --inplace

build: $(OPS_LIB)

demo: setup
	$(PY) -m mfconvert.demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/bench_shift_linear.py --threads 2
	$(PY) bench/bench_add_attention.py
	$(PY) bench/bench_moe_mlp.py

clean:
	rm -rf build *.egg-info $(OPS_LIB) out
