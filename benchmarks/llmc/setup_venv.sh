#!/usr/bin/env bash
# Creates benchmarks/.venv-llmc with llm-compressor and a CPU torch wheel (idempotent: a venv that already
# imports the pinned versions is left as it is).  llm-compressor pins transformers<=5.17 (ours is newer), so it
# gets its own venv; the worker (benchmarks/llmc/worker.py) runs there and imports nothing from obs_plugins.
#   bash benchmarks/llmc/setup_venv.sh            # PYTHON=python3.11 to choose the interpreter
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${LLMC_VENV:-$HERE/../.venv-llmc}"
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"   # the same as ours; llmcompressor 0.14.0.1 accepts 2.10.0..2.14.0
# Where the CPU torch wheel comes from: pip's own configuration (find-links / a local wheel dir) by default;
# set TORCH_INDEX=https://download.pytorch.org/whl/cpu on a machine that reaches the PyTorch index.
TORCH_INDEX="${TORCH_INDEX:-}"
EXTRA=()
[ -n "$TORCH_INDEX" ] && EXTRA=(--extra-index-url "$TORCH_INDEX")

check() {
  "$VENV/bin/python" - "$LLMC_VERSION" "$TORCH_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
import torch, llmcompressor  # noqa: F401
ok = version("llmcompressor") == sys.argv[1] and torch.__version__.split("+")[0] == sys.argv[2]
sys.exit(0 if ok else 1)
PY
}

if [ -x "$VENV/bin/python" ] && check; then
  echo "setup_venv.sh: $VENV already has llmcompressor $LLMC_VERSION and torch $TORCH_VERSION"
  exit 0
fi

PY="${PYTHON:-python3}"
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# The CPU torch wheel first, so that resolving llmcompressor keeps it (torch is pinned again below) and does
# not pull a CUDA build.
"$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "${EXTRA[@]}"
"$VENV/bin/python" -m pip install -q "llmcompressor==$LLMC_VERSION" "torch==$TORCH_VERSION" "${EXTRA[@]}"
check || { echo "setup_venv.sh: $VENV does not import llmcompressor $LLMC_VERSION with torch $TORCH_VERSION" >&2; exit 1; }
"$VENV/bin/python" - <<'PY'
from importlib.metadata import version
print("setup_venv.sh: installed", ", ".join(f"{p} {version(p)}" for p in
      ("llmcompressor", "compressed-tensors", "torch", "transformers", "accelerate")))
PY
echo "setup_venv.sh: done in $(( $(date +%s) - t0 )) s"
