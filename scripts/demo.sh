#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh), then runs the main job: the whole pipeline on one
# machine (tansu on SeaweedFS, a Milvus server, Triton on CPU, the four services, Prometheus serving
# the dashboard, Alertmanager) with FEBRL3 streamed through it, ending in a report and the
# dashboard's URL. Extra args go to `twinstream demo` (see --help; --rate N paces it, --keep keeps
# the stack).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/twinstream demo "$@"
