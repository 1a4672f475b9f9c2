#!/usr/bin/env bash
# The main job: set up (idempotent), then prune a real pretrained model and print the report.
# Extra arguments go to `obs-prune` (e.g. --sparsity 2:4, --iterations 3, --method wanda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/obs-prune "$@"
