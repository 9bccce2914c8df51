#!/usr/bin/env bash
# The GPU verdict on the paper's claim in one command, on a machine with JAX and no network:
#   scripts/gpu-verdict.sh [SEEDS...] [--models M1,M2] [--dry | --profile NAME] [options]
# SEEDS: "0,1,2" or "0 1 2" (default 0,1,2). It
#   1. installs the wheelhouse offline when keras/foolbox/ART are missing (the folder
#      scripts/wheelhouse.sh DIR --python 3.12 wrote, carried in the checkout: --wheelhouse,
#      default ./wheels), into WORK/site;
#   2. points DAREKIT_DATA at the wheelhouse's Fashion-MNIST (unless DAREKIT_DATA is set);
#   3. runs reproduce.py --profile verdict on KERAS_BACKEND=jax with
#      XLA_FLAGS=--xla_gpu_deterministic_ops=true (read when JAX starts: the profile is
#      deterministic), one job per (model, seed), all at once on the GPU (each job gets its
#      share of GPU memory: darekit.sweep) or one at a time without a GPU;
#   4. packs ONLY what must come back (results, per-image evaluation arrays, reports, plots,
#      logs, provenance, per-stage wall times; no weights, history, adversarial sets or mined
#      data) into OUT/verdict-<profile>-<models>-s<seeds>.tar.gz (split into 15 MiB parts when
#      larger), with gpu/timing.json (wall time of setup, run, pack), gpu/versions.txt.
# The script's own log goes to OUT as it runs, so a run killed at its limit still returns it.
# Options:
#   --models LIST       comma-separated (default vgg16,vgg19,alexnet); one per GPU run keeps
#                       each run within minutes
#   --dry               the verdict-dry profile: every verdict stage at the dry scale (a CPU,
#                       minutes per architecture); --profile NAME for any other
#   --attacks LIST      attacks (default: the profile's)
#   --jobs N            jobs at a time (default: all of them with a GPU, 1 without)
#   --out DIR           where the results go (default $OUT, else ./verdict-out)
#   --wheelhouse DIR    (default ./wheels)   --work DIR  scratch: runs, site (default
#                       ${TMPDIR:-/tmp}/darekit-verdict)   --python PY (default python3)
#   --time-limit S      stop the jobs after S seconds and pack what finished (a device call
#                       has 600 s: leave ~40 s for the pack)
# Then, here: python scripts/combine-verdict.py OUT... --out docs/results/verdict
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'; }

SEEDS=()
MODELS=vgg16,vgg19,alexnet
PROFILE=verdict
ATTACKS=""
JOBS=""
OUTDIR="${OUT:-$PWD/verdict-out}"
WHEELS="$ROOT/wheels"
WORK="${TMPDIR:-/tmp}/darekit-verdict"
PY="${PYTHON:-python3}"
LIMIT=""
need() { [ $# -ge 2 ] && [ -n "$2" ] || { echo "error: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --models) need "$@"; MODELS="$2"; shift 2 ;;
    --profile) need "$@"; PROFILE="$2"; shift 2 ;;
    --dry) PROFILE=verdict-dry; shift ;;
    --attacks) need "$@"; ATTACKS="$2"; shift 2 ;;
    --jobs) need "$@"; JOBS="$2"; shift 2 ;;
    --out) need "$@"; OUTDIR="$2"; shift 2 ;;
    --wheelhouse) need "$@"; WHEELS="$2"; shift 2 ;;
    --work) need "$@"; WORK="$2"; shift 2 ;;
    --python) need "$@"; PY="$2"; shift 2 ;;
    --time-limit) need "$@"; LIMIT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "error: unknown option $1 (--help lists them)" >&2; exit 2 ;;
    *) SEEDS+=("$1"); shift ;;
  esac
done
[ ${#SEEDS[@]} -gt 0 ] || SEEDS=(0,1,2)
SEEDS_CSV="$(echo "${SEEDS[*]}" | tr -s ' ,' ',,' | sed 's/^,//; s/,$//')"
[[ "$SEEDS_CSV" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "error: seeds must be integers: $SEEDS_CSV" >&2; exit 2; }
[[ "$MODELS" =~ ^[a-z0-9]+(,[a-z0-9]+)*$ ]] || { echo "error: --models must be names, comma-separated: $MODELS" >&2; exit 2; }
mkdir -p "$OUTDIR" "$WORK" || exit 1
OUTDIR="$(cd "$OUTDIR" && pwd)"
WORK="$(cd "$WORK" && pwd)"
TAG="verdict-${PROFILE}-${MODELS//,/+}-s${SEEDS_CSV//,/+}"
LOG="$OUTDIR/$TAG.log"
GPU="$WORK/gpu-$TAG"
rm -rf "$GPU"; mkdir -p "$GPU"
say() { echo "[gpu-verdict $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
: >"$LOG"
t0=$(date +%s)
cd "$ROOT"

# 1. The wheelhouse, offline, unless the environment has the packages already.
if ! KERAS_BACKEND=jax "$PY" -c "import keras, foolbox, eagerpy, art" 2>/dev/null; then
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { say "error: keras/foolbox/ART missing and no wheels in $WHEELS (scripts/wheelhouse.sh $WHEELS --python 3.12)"; exit 1; }
  say "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS (offline)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$WHEELS"/*.whl >>"$LOG" 2>&1 || { say "error: pip install failed"; exit 1; }
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# 2. Data, backend, determinism, output.
if [ -z "${DAREKIT_DATA:-}" ] && [ -s "$WHEELS/fashion_mnist/train-images-idx3-ubyte.gz" ]; then
  export DAREKIT_DATA="$WHEELS"
fi
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 DAREKIT_RUNS="$WORK/runs"
case " ${XLA_FLAGS:-} " in
  *" --xla_gpu_deterministic_ops=true "*) ;;
  *) export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_deterministic_ops=true" ;;
esac
n_jobs=$(( $(echo "$MODELS" | tr ',' '\n' | wc -l) * $(echo "$SEEDS_CSV" | tr ',' '\n' | wc -l) ))
if [ -z "$JOBS" ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then JOBS=$n_jobs; else JOBS=1; fi
fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"; echo "host: $(uname -a)"
  echo "python: $("$PY" -V 2>&1)"; echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "XLA_FLAGS: $XLA_FLAGS"; echo "DAREKIT_DATA: ${DAREKIT_DATA:-default}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -m pip list --format=freeze 2>/dev/null | grep -i -E '^(jax|jaxlib|jax-cuda|keras|numpy|foolbox|eagerpy|adversarial|scipy|ml.dtypes|nvidia-cudnn)' 
} >"$GPU/versions.txt" 2>&1
t1=$(date +%s)
say "profile $PROFILE, models $MODELS, seeds $SEEDS_CSV: $n_jobs job(s), $JOBS at a time; runs in $DAREKIT_RUNS; setup $((t1 - t0))s"

# 3. The verdict's jobs (finished stages and jobs are skipped on a rerun in the same WORK).
cmd=("$PY" reproduce.py --dataset fashion_mnist --models "$MODELS" --seeds "$SEEDS_CSV"
     --profile "$PROFILE" --jobs "$JOBS")
[ -n "$ATTACKS" ] && cmd+=(--attack "$ATTACKS")
[ -n "$LIMIT" ] && cmd=(timeout --signal=TERM --kill-after=20 "$LIMIT" "${cmd[@]}")
say "${cmd[*]}"
"${cmd[@]}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
t2=$(date +%s)
say "reproduce.py exit $rc after $((t2 - t1))s"

# 4. Only what must come back.
runs=()
for m in ${MODELS//,/ }; do
  for s in ${SEEDS_CSV//,/ }; do runs+=("$DAREKIT_RUNS/fashion_mnist-$m-$PROFILE-s$s"); done
done
cp "$LOG" "$GPU/gpu-verdict.log"
printf '{"profile": "%s", "models": "%s", "seeds": "%s", "jobs": %s, "exit_code": %s, "seconds": {"setup": %s, "run": %s}}\n' \
  "$PROFILE" "$MODELS" "$SEEDS_CSV" "$JOBS" "$rc" "$((t1 - t0))" "$((t2 - t1))" >"$GPU/timing.json"
"$PY" -m darekit.verdict pack "${runs[@]}" --out "$OUTDIR" --name "$TAG" --extra "$GPU" 2>&1 | tee -a "$LOG"
prc=${PIPESTATUS[0]}
say "packed in $(( $(date +%s) - t2 ))s; total $(( $(date +%s) - t0 ))s"
[ "$prc" = 0 ] || exit "$prc"
exit "$rc"
