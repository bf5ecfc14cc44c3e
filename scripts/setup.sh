#!/usr/bin/env bash
# Create or update the project virtualenv (called by `make setup`; safe to re-run).
#
# torch:  if the system Python already imports torch (a GPU image with its own CUDA/ROCm build),
#         the venv sees it through --system-site-packages and torch is never installed here.
#         Otherwise a plain venv gets the CPU wheel torch==$TORCH_VERSION.
# triton: left alone if it already imports or if torch is a CUDA/ROCm build (those pin their own);
#         a CPU torch gets triton==$TRITON_VERSION so the Triton interpreter tests can run.
# Then flashport itself is installed editable with its test extras.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TRITON_VERSION="${TRITON_VERSION:-3.7.1}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VPY="$VENV/bin/python"

log() { echo "setup: $*"; }

if [ ! -x "$VPY" ]; then
    if "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
        log "system $PYTHON has torch; creating $VENV with --system-site-packages"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        log "creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
fi

# Also covers a venv whose first setup was interrupted before torch was in.
if ! "$VPY" -c 'import torch' >/dev/null 2>&1; then
    log "installing torch==$TORCH_VERSION"
    "$VPY" -m pip install "torch==$TORCH_VERSION"
fi

if ! "$VPY" -c 'import triton' >/dev/null 2>&1; then
    if "$VPY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None and torch.version.hip is None else 1)'; then
        log "CPU torch without triton; installing triton==$TRITON_VERSION (for TRITON_INTERPRET=1)"
        "$VPY" -m pip install "triton==$TRITON_VERSION"
    else
        log "warning: GPU torch without an importable triton; not installing one over it"
    fi
fi

# Build in the venv itself when its setuptools is new enough (fast, works offline);
# otherwise let pip fetch a build backend in an isolated environment.
PIP_BUILD_FLAGS=()
if "$VPY" - <<'PY' >/dev/null 2>&1
import sys
import setuptools
major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
sys.exit(0 if (major, minor) >= (70, 1) else 1)
PY
then
    PIP_BUILD_FLAGS+=(--no-build-isolation)
fi

log "installing flashport (editable, with test extras)"
"$VPY" -m pip install --quiet "${PIP_BUILD_FLAGS[@]}" -e '.[test]'
log "done"
