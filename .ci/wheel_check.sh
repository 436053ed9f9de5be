#!/usr/bin/env bash
# The packaging check (`make wheel-check`): what a user gets from the built wheel, in fresh venvs.
#  1. build the wheel from a copy of the checkout (building in place rewrites edgekit_ml.egg-info);
#  2. venv "convert": the wheel with [convert]; a tiny Qwen2 (built in code, tests/tiny_*.py) converted by
#     the `edgekit` command to GGUF (q8_0) and ONNX (int8), then both run through edgekit.load;
#  3. venv "runtime": the wheel with [runtime] only; asserts torch is not installed, runs edgekit.load
#     (generate, chat, logits) and `edgekit run` on both artifacts, same logits as in step 2; then [serve]
#     added: `edgekit serve` answers a chat completion for each, still without torch.
# Versions come from requirements.txt as constraints (-c: the extras decide what is installed, the pins
# which version). llama-cpp-python is never compiled here: it comes from the wheelhouse the Makefile
# built once (WHEELHOUSE), --only-binary so a missing wheel fails instead of compiling for 10 minutes.
# Env: PYTHON (base interpreter), WHEELHOUSE, WHEEL_CHECK_DIR (kept when set; else a temp dir, removed).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELHOUSE="$(cd "${WHEELHOUSE:-$REPO/.venv/wheelhouse}" && pwd)"
if [[ -n "${WHEEL_CHECK_DIR:-}" ]]; then
    WORK="$WHEEL_CHECK_DIR"; rm -rf "$WORK"; mkdir -p "$WORK"
else
    WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT
fi
WORK="$(cd "$WORK" && pwd)"
HELPER="$REPO/.ci/wheel_check.py"
ls "$WHEELHOUSE"/llama_cpp_python-*.whl >/dev/null || { echo "no llama-cpp-python wheel in $WHEELHOUSE (make setup builds it)"; exit 1; }
PIP_ARGS=(-q -c "$REPO/requirements.txt" --find-links "$WHEELHOUSE" --only-binary llama-cpp-python)
T0=$SECONDS
step() { echo "== wheel-check [$((SECONDS - T0)) s] $*"; }

step "build the wheel"
mkdir -p "$WORK/src"
tar -C "$REPO" --exclude=./.venv --exclude=./.git --exclude=./out --exclude=./build --exclude=./dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=./tests/artifacts -cf - . | tar -C "$WORK/src" -xf -
"$PYTHON" -m venv "$WORK/build-env"
"$WORK/build-env/bin/pip" install -q build
"$WORK/build-env/bin/python" -m build --wheel --outdir "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1 ||
    { cat "$WORK/build.log"; exit 1; }
WHEEL="$(ls "$WORK"/dist/edgekit_ml-*.whl)"
echo "$WHEEL"

step "fresh venv: the wheel with [convert]"
"$PYTHON" -m venv "$WORK/convert"
CPY="$WORK/convert/bin/python"
"$CPY" -m pip install "${PIP_ARGS[@]}" "edgekit-ml[convert] @ file://$WHEEL"
"$CPY" -m pip check
T_CONVERT_INSTALL=$((SECONDS - T0))

step "tiny model; convert to GGUF and ONNX with the edgekit command"
cd "$WORK"  # never the repository root: its edgekit/ folder would shadow the wheel
"$CPY" "$HELPER" tiny-model "$REPO" "$WORK/tiny-qwen2"
"$WORK/convert/bin/edgekit" convert "$WORK/tiny-qwen2" --format gguf --quant q8_0 --out "$WORK/gguf"
"$WORK/convert/bin/edgekit" convert "$WORK/tiny-qwen2" --format onnx --quant int8 --out "$WORK/onnx"
"$CPY" "$HELPER" run "$WORK/convert.npz" "$WORK/gguf" "$WORK/onnx"
T_CONVERT=$((SECONDS - T0))

step "fresh venv: the wheel with [runtime] only (no torch)"
"$PYTHON" -m venv "$WORK/runtime"
RPY="$WORK/runtime/bin/python"
"$RPY" -m pip install "${PIP_ARGS[@]}" "edgekit-ml[runtime] @ file://$WHEEL"
"$RPY" -m pip check
"$RPY" "$HELPER" no-torch
"$RPY" "$HELPER" run "$WORK/runtime.npz" "$WORK/gguf" "$WORK/onnx"
"$RPY" "$HELPER" compare "$WORK/convert.npz" "$WORK/runtime.npz"
"$WORK/runtime/bin/edgekit" run "$WORK/gguf" "Hello" --max-tokens 4
"$WORK/runtime/bin/edgekit" run "$WORK/onnx" "Hello" --max-tokens 4
step "the same venv plus [serve]: edgekit serve over both artifacts, still no torch"
"$RPY" -m pip install "${PIP_ARGS[@]}" "edgekit-ml[serve] @ file://$WHEEL"
"$RPY" -m pip check
"$RPY" "$HELPER" no-torch
"$RPY" "$HELPER" serve "$WORK/runtime/bin/edgekit" "$WORK/gguf" "$WORK/onnx"
step "done: convert venv install+convert ${T_CONVERT}s (install ${T_CONVERT_INSTALL}s), total $((SECONDS - T0)) s"
