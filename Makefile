# make demo  — set up .venv, build the custom ops; a digit ViT through --moe-mlp + finetune, served; then MiniLM
# make test  — set up if needed, run the test suite, then a bounded sanitizer + fuzz slice
# make sanitize — the kernel tests against an ASan+UBSan build of the ops (build/asan/)
# make fuzz  — the long fuzz run (kernels and CLI; kernels also under the sanitizers)
# make reliability — sanitize + fuzz
# make mutation — plant each bug of tools/mutants.py in a copy and check that its tests catch it
PY      := .venv/bin/python
PIP     := .venv/bin/pip
OPS_LIB := ort_ops/libmfconvert_ops.so
OPS_SRC := $(wildcard ort_ops/src/*.cc ort_ops/src/*.h) ort_ops/src/exports.map
TORCH   ?= torch==2.13.0

.PHONY: setup build demo test bench clean sanitize sanitize-quick fuzz reliability mutation FORCE
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
	$(MAKE) --no-print-directory sanitize-quick

# The op library with AddressSanitizer and UBSan (every UB finding aborts; float-to-int
# conversions out of range included, which -fsanitize=undefined leaves out), beside the shared
# library, never over it. Python is not built with ASan: libasan is preloaded (with libstdc++,
# whose __cxa_throw ASan must find at start-up), and its leak check is off (the interpreter
# leaks by design). Reports go to build/asan/report.PID (pytest captures stderr, and a process
# that dies loses it) and are printed when the run fails. MFCONVERT_OPS_LIBRARY makes
# mfconvert.ort_ops.library_path() return this build.
ASAN_DIR    := build/asan
ASAN_LIB    := $(ASAN_DIR)/libmfconvert_ops.so
ASAN_FLAGS  := -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=undefined,float-cast-overflow \
               -fno-omit-frame-pointer
ASAN_CXX    := -std=c++17 -O1 -g $(ASAN_FLAGS) -fPIC -fvisibility=hidden -fno-math-errno \
               -ffp-contract=off -Wall -Wextra -Wno-unused-parameter
ASAN_OBJS   := $(patsubst ort_ops/src/%.cc,$(ASAN_DIR)/%.o,$(wildcard ort_ops/src/*.cc))
ORT_INC      = $(eval ORT_INC := $(shell $(PY) -c 'import setup; print(setup.ort_include_dir())'))$(ORT_INC)
ASAN_ENV     = LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
               ASAN_OPTIONS=detect_leaks=0:log_path=$(CURDIR)/$(ASAN_DIR)/report \
               UBSAN_OPTIONS=print_stacktrace=1:log_path=$(CURDIR)/$(ASAN_DIR)/report \
               MFCONVERT_OPS_LIBRARY=$(CURDIR)/$(ASAN_LIB)
ASAN_REPORT  = { cat $(ASAN_DIR)/report.* 2>/dev/null; exit 1; }
KERNEL_TESTS := tests/test_shift_linear_kernel.py tests/test_add_attention_kernel.py \
                tests/test_shift_conv_kernel.py tests/test_adder_conv_kernel.py \
                tests/test_kernel_hostile.py tests/test_kernel_fuzz.py tests/test_spatial_shift_kernel.py \
                tests/test_spatial_shift_fuzz.py tests/test_shift_conv_read_through.py
# Examples per fuzz test: a few in make test, many in make fuzz.
FUZZ_QUICK  ?= 60
FUZZ_LONG   ?= 2000
FUZZ_ASAN   ?= 300

# The objects are rebuilt when these flags change (the stamp is rewritten only then).
$(ASAN_DIR)/flags: FORCE
	@mkdir -p $(ASAN_DIR)
	@echo '$(CXX) $(ASAN_CXX)' | cmp -s - $@ || echo '$(CXX) $(ASAN_CXX)' > $@

$(ASAN_DIR)/%.o: ort_ops/src/%.cc $(wildcard ort_ops/src/*.h) $(ASAN_DIR)/flags | .venv/.installed
	$(CXX) $(ASAN_CXX) -Iort_ops/src -I$(ORT_INC) -c $< -o $@

$(ASAN_LIB): $(ASAN_OBJS) ort_ops/src/exports.map
	$(CXX) -shared $(ASAN_FLAGS) -o $@.tmp $(ASAN_OBJS) -Wl,--version-script=ort_ops/src/exports.map -pthread
	mv -f $@.tmp $@

sanitize: setup $(ASAN_LIB)
	rm -f $(ASAN_DIR)/report.*
	$(ASAN_ENV) MFCONVERT_FUZZ_EXAMPLES=$(FUZZ_QUICK) $(PY) -m pytest -q -p no:cacheprovider \
	    $(KERNEL_TESTS) || $(ASAN_REPORT)

sanitize-quick: setup $(ASAN_LIB)
	rm -f $(ASAN_DIR)/report.*
	$(ASAN_ENV) MFCONVERT_FUZZ_EXAMPLES=$(FUZZ_QUICK) $(PY) -m pytest -q -p no:cacheprovider \
	    tests/test_kernel_hostile.py tests/test_kernel_fuzz.py tests/test_spatial_shift_fuzz.py \
	    tests/test_shift_conv_read_through.py::test_read_through_fuzz || $(ASAN_REPORT)

fuzz: setup $(ASAN_LIB)
	MFCONVERT_FUZZ_EXAMPLES=$(FUZZ_LONG) $(PY) -m pytest -q $(wildcard tests/test_*fuzz*.py)
	rm -f $(ASAN_DIR)/report.*
	$(ASAN_ENV) MFCONVERT_FUZZ_EXAMPLES=$(FUZZ_ASAN) $(PY) -m pytest -q -p no:cacheprovider \
	    tests/test_kernel_fuzz.py || $(ASAN_REPORT)

reliability: sanitize fuzz

# Result in BENCHMARKS.md ("Mutation check"); exit status 1 when a mutant survives.
mutation: setup
	$(PY) tools/mutation.py

bench: setup
	$(PY) bench/bench_shift_linear.py --threads 2
	$(PY) bench/bench_add_attention.py
	$(PY) bench/bench_moe_mlp.py

clean:
	rm -rf build *.egg-info $(OPS_LIB) out
