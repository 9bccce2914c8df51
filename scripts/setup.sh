#!/usr/bin/env bash
# Set up everything on a fresh Debian/Ubuntu machine with Python 3.11: a local virtual
# environment in .venv with the pinned dependencies, and real Fashion-MNIST.
# Idempotent: a second run only checks. Run by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
FM_SYSTEM=/usr/share/datasets/fashion-mnist
FM_LOCAL="$ROOT/data/fashion_mnist"
say() { printf '[setup] %s\n' "$*"; }

# 1. Python virtual environment with the requirements (the venv module is in python3-venv).
if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
  say "python3-venv is missing; installing it"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq python3-venv
  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv
  else say "error: install python3-venv (apt-get install python3-venv) and rerun"; exit 1; fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi
install_main() {
  local stamp="$VENV/.requirements.sha" want
  want="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/setup.py" | sha1sum | cut -c1-40)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing requirements into .venv (TensorFlow CPU build; a few minutes the first time)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements-dev.txt"
    "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
    echo "$want" > "$stamp"
  fi
  touch "$VENV/.editable-done"
}

# 1b. A second environment for Keras' JAX backend, without TensorFlow (.venv-jax): the test
# suite's JAX tier runs there, proving that no stage needs TensorFlow (a GPU machine with JAX
# and no TensorFlow is the target). DAREKIT_NO_JAX_VENV=1 skips it.
VENV_JAX="$ROOT/.venv-jax"
if [ "${DAREKIT_NO_JAX_VENV:-0}" != 1 ]; then
  if [ ! -x "$VENV_JAX/bin/python" ]; then
    say "creating $VENV_JAX (Keras on JAX, no TensorFlow)"
    "$PY" -m venv "$VENV_JAX"
  fi
fi
install_jax() {
  local stamp_jax="$VENV_JAX/.requirements.sha" want_jax
  want_jax="$(cat "$ROOT/requirements-jax.txt" "$ROOT/requirements-dev.txt" "$ROOT/setup.py" | sha1sum | cut -c1-40)"
  if [ "$(cat "$stamp_jax" 2>/dev/null)" != "$want_jax" ]; then
    say "installing the JAX requirements into .venv-jax"
    "$VENV_JAX/bin/python" -m pip install -q --upgrade pip
    "$VENV_JAX/bin/python" -m pip install -q -r "$ROOT/requirements-jax.txt" "pytest>=8" "hypothesis>=6.100"
    # The editable install writes darekit.egg-info in the checkout: one pip at a time.
    while [ ! -e "$VENV/.editable-done" ]; do sleep 1; done
    "$VENV_JAX/bin/python" -m pip install -q --no-deps -e "$ROOT"
    if "$VENV_JAX/bin/python" -c 'import tensorflow' 2>/dev/null; then
      say "error: TensorFlow got into .venv-jax; remove it (rm -r .venv-jax) and rerun"; return 1
    fi
    echo "$want_jax" > "$stamp_jax"
  fi
}
# The two installs are mostly downloads and unpacking: side by side they take the time of the
# larger one (TensorFlow's).
if [ "${DAREKIT_NO_JAX_VENV:-0}" != 1 ]; then
  rm -f "$VENV/.editable-done"
  install_jax & jax_pid=$!
  trap 'kill "$jax_pid" 2>/dev/null || true' EXIT   # a failed main install stops it too
  install_main
  wait "$jax_pid" || { say "error: installing .venv-jax failed"; exit 1; }
else
  install_main
fi

# 2. Real Fashion-MNIST: Debian's package when we can install it, else Keras' downloader.
fm_files="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
have_fm() { for f in $fm_files; do [ -s "$1/$f" ] || return 1; done; }
if ! have_fm "$FM_SYSTEM" && ! have_fm "$FM_LOCAL"; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian's dataset-fashion-mnist"
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || true
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    say "installing Debian's dataset-fashion-mnist (sudo)"
    (sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist) || true
  fi
fi
if ! have_fm "$FM_SYSTEM" && ! have_fm "$FM_LOCAL"; then
  say "Debian's package is not available; trying Keras' downloader"
  if ! "$VENV/bin/python" - <<'PY'
import sys
sys.path.insert(0, ".")
from darekit.data import load_dataset
from darekit.errors import DareError
try:
    load_dataset("fashion_mnist", download=True)
except DareError as e:
    print(f"[setup] error: {e}", file=sys.stderr)
    sys.exit(1)
PY
  then
    say "error: could not get Fashion-MNIST. Install Debian's package (sudo apt-get install"
    say "dataset-fashion-mnist) or put the four files ($fm_files) into $FM_LOCAL"
    exit 1
  fi
fi
say "ready: $("$VENV/bin/python" -c 'import tensorflow as tf, jax, keras, foolbox; print("tensorflow", tf.__version__, "jax", jax.__version__, "keras", keras.__version__, "foolbox", foolbox.__version__)' 2>/dev/null)"
