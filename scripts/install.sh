#!/usr/bin/env bash
# Installs everything deltaproxy needs into .venv (idempotent; a stamp skips
# the work when nothing changed).
#
# llama-cpp-python is built from source with AMX and AVX-512 off: the virtual
# CPUs here advertise AMX but fault on it, and some have no AVX-512. pip's wheel
# cache does not key on CMAKE_ARGS, so the wheel is built into a folder named
# after the flags and installed from there, never from the cache.
set -euo pipefail
cd "$(dirname "$0")/.."

# One install at a time per checkout (`make run` and `make test` started together on a
# fresh machine): the second waits here, then finds the stamp written.
exec 9>.install.lock
flock 9

PYTHON=${PYTHON:-python3}
LLAMA_VERSION=0.3.36
LLAMA_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
WHEELS=${DELTAPROXY_WHEELS:-$HOME/.cache/deltaproxy/wheels/llama-cpp-python-$LLAMA_VERSION-avx2-noamx}
STAMP=.venv/.deltaproxy-installed
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/pip"
$PIP install -q --upgrade pip
# The CPU wheel on disk; a bare `torch` would pull a multi-GB CUDA build.
$PIP install -q torch==2.13.0

if ! ls "$WHEELS"/llama_cpp_python-$LLAMA_VERSION-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_VERSION (about 5 minutes, once)..." >&2
    # Built beside, then renamed into the shared folder: another checkout installing at the
    # same time never sees half a wheel (two builds of the same flags give the same wheel).
    mkdir -p "$WHEELS"
    build=$(mktemp -d "$WHEELS.build.XXXXXX")
    trap 'rm -rf "$build"' EXIT
    CMAKE_ARGS="$LLAMA_FLAGS" $PIP wheel -q --no-deps --no-cache-dir -w "$build" "llama-cpp-python==$LLAMA_VERSION"
    mv "$build"/llama_cpp_python-$LLAMA_VERSION-*.whl "$WHEELS"/
fi
$PIP install -q --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-$LLAMA_VERSION-*.whl
$PIP install -q -e ".[test]"

# A one-token decode proves the build runs on this CPU (a wrong build dies here, not in a test).
.venv/bin/python - <<'PY'
import llama_cpp
from proxy.pair.model_files import packaged_gguf
llm = llama_cpp.Llama(str(packaged_gguf("smollm2")), n_ctx=64, n_threads=2, verbose=False)
llm.eval(llm.tokenize(b"Hello", add_bos=False))
print("llama.cpp check: ok")
PY
echo "$want" > "$STAMP"
