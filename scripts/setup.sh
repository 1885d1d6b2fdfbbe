#!/usr/bin/env bash
# Installs everything twinstream needs on one machine, idempotently:
#   .venv         the services, the learning code and the dev tools (numpy 2, Milvus Lite, tansu)
#   .venv-triton  the Triton Inference Server from nvidia-pytriton (its python backend needs numpy<2,
#                 so it lives apart, as it would in its own container in production)
#   prometheus    Debian's server and promtool, when apt can install it (optional)
# Re-running is cheap: each step is skipped when its stamp matches its inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
TORCH_SPEC="torch==2.13.0"   # the local CPU wheel; never ask for an unpinned torch
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

main_key=$(cat pyproject.toml | sha256sum | cut -c1-16)
if ! stamp_ok .venv/.twinstream-stamp "$main_key"; then
  log "creating .venv (services, learning, dev tools)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -m pip install -q -e ".[dev,bench]" 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import torch, twinstream, pymilvus, kafka, tritonclient.grpc" \
    || { log "the .venv install failed"; exit 1; }
  echo "$main_key" > .venv/.twinstream-stamp
fi

# openvino runs the encoder inside Triton's python backend; its wheel accepts numpy 1.16-2.5,
# so it installs next to numpy<2 (keep the pin equal to pyproject.toml's).
OPENVINO_SPEC="openvino==2026.4.1"
triton_key="nvidia-pytriton==0.7.0 numpy<2 $TORCH_SPEC $OPENVINO_SPEC"
if ! stamp_ok .venv-triton/.twinstream-stamp "$triton_key"; then
  log "creating .venv-triton (Triton Inference Server 2.51, python backend, CPU)"
  [ -x .venv-triton/bin/python ] || "$PY" -m venv .venv-triton
  # shellcheck disable=SC2086
  .venv-triton/bin/python -m pip install -q $TORCH_SPEC 2>&1 | grep -v '^WARNING: Location' || true
  .venv-triton/bin/python -m pip install -q "nvidia-pytriton==0.7.0" "numpy<2" "$OPENVINO_SPEC" 2>&1 \
    | grep -v '^WARNING: Location' || true
  .venv-triton/bin/python -c "import torch, numpy, pytriton, openvino; assert numpy.__version__ < '2'" \
    || { log "the .venv-triton install failed"; exit 1; }
  echo "$triton_key" > .venv-triton/.twinstream-stamp
fi
# The stub embeds the system libpython of the same minor version as the venv.
pyver=$(.venv-triton/bin/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if ! ldconfig -p | grep -q "libpython${pyver}.so.1.0"; then
  log "installing libpython${pyver} for Triton's python backend stub"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "libpython${pyver}") >/dev/null 2>&1 \
    || log "could not install libpython${pyver}: Triton's python backend will not start"
fi

if ! command -v prometheus >/dev/null 2>&1; then
  log "installing Debian's prometheus (optional: the stack runs without it)"
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus) \
      >/dev/null 2>&1 || log "prometheus could not be installed; dashboards are skipped"
  fi
  # Debian starts the packaged service where it can; the stack runs its own instance.
  (command -v service >/dev/null && service prometheus stop) >/dev/null 2>&1 || true
  pkill -x prometheus >/dev/null 2>&1 || true
fi
log "ready: $ROOT/.venv and $ROOT/.venv-triton"
