#!/usr/bin/env bash
# Regenerates the Python code for protos/ into OUT (default services/), with typed stubs.
# tests/test_protos.py runs this into a temporary folder and fails when the committed code is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-services}
PY=${PYTHON:-.venv/bin/python}
export PATH="$(dirname "$PY"):$PATH"
mkdir -p "$OUT/twinstream/v1"
"$PY" -m grpc_tools.protoc -Iprotos \
  --python_out="$OUT" --grpc_python_out="$OUT" \
  --mypy_out="$OUT" --mypy_grpc_out="$OUT" \
  protos/twinstream/v1/*.proto
touch "$OUT/twinstream/v1/__init__.py"
