#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the linter and the test suite on both Keras
# backends: every tier on TensorFlow (.venv), and on JAX without TensorFlow (.venv-jax) the fast
# tier and the slow tests marked `jax` (tests marked `tensorflow_only` are deselected there).
# The two backends run side by side (a pytest process is fixed to one backend; much of a test's
# time is one core's: interpreter starts, tracing, XLA compiles), and JAX's output is printed
# when it ends. DAREKIT_TEST_SERIAL=1 runs them one after the other.
# The TensorFlow tier runs in DAREKIT_TEST_WORKERS pytest workers (default 2, pytest-xdist, one
# test file per worker at a time: a file's module fixtures are built once); 1 runs it in one
# process. Much of a test's time is one core's, so on 2 cores two workers beside the JAX tier
# keep both busy.
# Extra arguments go to both pytest runs; DAREKIT_TEST_BACKENDS="tensorflow" (or "jax") runs one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
.venv/bin/ruff check .
backends="${DAREKIT_TEST_BACKENDS:-tensorflow jax}"

run_tf() {
  local workers="${DAREKIT_TEST_WORKERS:-2}" par=()
  # Files in collection order (conftest puts the longest first; the flag needs xdist >= 3.8),
  # not xdist's default, most tests first, which left the one-test dry run alone at the end.
  [ "$workers" -gt 1 ] && par=(-n "$workers" --dist loadfile --no-loadscope-reorder)
  echo "=== pytest on TensorFlow (.venv), $workers worker(s) ==="
  KERAS_BACKEND=tensorflow .venv/bin/python -m pytest "${par[@]}" "$@"
}
run_jax() {
  echo "=== pytest on JAX, without TensorFlow (.venv-jax) ==="
  KERAS_BACKEND=jax JAX_PLATFORMS=cpu .venv-jax/bin/python -m pytest \
    -m "(not slow or jax) and not tensorflow_only" "$@"
}
for b in $backends; do
  case "$b" in tensorflow|jax) ;; *) echo "unknown backend $b" >&2; exit 2 ;; esac
done

start=$SECONDS
if [ "$backends" = "tensorflow jax" ] && [ "${DAREKIT_TEST_SERIAL:-0}" != 1 ]; then
  jax_log="$(mktemp "${TMPDIR:-/tmp}/darekit-jax-tests.XXXXXX")"
  run_jax "$@" >"$jax_log" 2>&1 & jax_pid=$!
  trap 'kill "$jax_pid" 2>/dev/null || true' INT TERM
  tf_rc=0; run_tf "$@" || tf_rc=$?
  echo "=== TensorFlow tier: exit $tf_rc after $((SECONDS - start)) s; waiting for JAX ==="
  jax_rc=0; wait "$jax_pid" || jax_rc=$?
  cat "$jax_log"; rm -f "$jax_log"
  echo "=== JAX tier: exit $jax_rc; both done in $((SECONDS - start)) s ==="
  [ "$tf_rc" = 0 ] && [ "$jax_rc" = 0 ]
else
  for b in $backends; do
    if [ "$b" = tensorflow ]; then run_tf "$@"; else run_jax "$@"; fi
  done
  echo "=== tests done in $((SECONDS - start)) s ==="
fi
