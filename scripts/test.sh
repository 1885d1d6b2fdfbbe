#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh), then runs the whole test suite: unit tests, the
# real local stack (tansu on SeaweedFS, a Milvus server, Triton, the four services, Prometheus), crash/rebalance
# recovery, Helm and Prometheus config checks, and the learning tests (layout: docs/testing.md:
# tests/unit start nothing, tests/stack start processes). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
set +e
.venv/bin/python -m pytest -p no:cacheprovider -rs "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$status"
