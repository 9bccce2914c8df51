#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the linter and the test suite on both Keras
# backends: every tier on TensorFlow (.venv), then on JAX without TensorFlow (.venv-jax) the fast
# tier and the slow tests marked `jax` (tests marked `tensorflow_only` are deselected there).
# Extra arguments go to both pytest runs; DAREKIT_TEST_BACKENDS="tensorflow" (or "jax") runs one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
.venv/bin/ruff check .
backends="${DAREKIT_TEST_BACKENDS:-tensorflow jax}"
for b in $backends; do
  case "$b" in
    tensorflow)
      echo "=== pytest on TensorFlow (.venv) ==="
      KERAS_BACKEND=tensorflow .venv/bin/python -m pytest "$@" ;;
    jax)
      echo "=== pytest on JAX, without TensorFlow (.venv-jax) ==="
      KERAS_BACKEND=jax JAX_PLATFORMS=cpu .venv-jax/bin/python -m pytest \
        -m "(not slow or jax) and not tensorflow_only" "$@" ;;
    *) echo "unknown backend $b" >&2; exit 2 ;;
  esac
done
