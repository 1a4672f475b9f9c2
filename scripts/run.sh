#!/usr/bin/env bash
# The main job: set up (idempotent), then prune a real pretrained model and print the report.
# Extra arguments go to `obs-prune` (e.g. --sparsity 2:4, --iterations 3, --method wanda).
set -euo pipefail
caller="$PWD"
root="$(CDPATH= cd -- "$(dirname -- "$0")/.." >/dev/null && pwd)"
bash "$root/scripts/setup.sh"
cd "$caller"   # the user's relative paths (--json, --save, --model, --config) stay theirs
exec "$root/.venv/bin/obs-prune" "$@"
