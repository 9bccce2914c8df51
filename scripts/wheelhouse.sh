#!/usr/bin/env bash
# Everything a machine with JAX and no network needs beyond its image, in one folder:
#   scripts/wheelhouse.sh DIR [--python 3.12]
# puts into DIR the wheels darekit needs on Keras' JAX backend that such a machine lacks (keras,
# namex, optree, foolbox, eagerpy, GitPython and its dependencies, ART, six) for that Python on
# x86-64 Linux, and Fashion-MNIST's four files (DIR/fashion_mnist). There, with no network:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#   export PYTHONPATH=/tmp/site:$PWD DAREKIT_DATA=DIR KERAS_BACKEND=jax
# (the GPU image brings JAX with CUDA, NumPy, SciPy, scikit-learn, h5py, matplotlib, tqdm, rich,
# absl-py, ml-dtypes). The folder must stay under 64 MiB (the device tool's limit per call); the
# script prints its size and fails above it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:?usage: scripts/wheelhouse.sh DIR [--python 3.12]}"
shift
PYV=3.12
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYV="$2"; shift 2 ;;
    *) echo "error: unknown option $1" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
mkdir -p "$DIR"
# One version of each: the versions this repository is tested with.
PKGS=(
  "keras==3.15.1" "namex" "optree" "foolbox==3.3.4" "eagerpy==0.30.0" "GitPython" "gitdb"
  "smmap" "adversarial-robustness-toolbox==1.20.1" "six"
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
  --implementation cp "${platforms[@]}" -d "$DIR" "${PKGS[@]}"

# Fashion-MNIST: Debian's package (scripts/setup.sh installs it), else data/fashion_mnist.
fm_files="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
mkdir -p "$DIR/fashion_mnist"
for src in /usr/share/datasets/fashion-mnist "$ROOT/data/fashion_mnist"; do
  ok=1
  for f in $fm_files; do [ -s "$src/$f" ] || ok=0; done
  if [ $ok = 1 ]; then
    for f in $fm_files; do cp "$src/$f" "$DIR/fashion_mnist/$f"; done
    break
  fi
done
for f in $fm_files; do
  [ -s "$DIR/fashion_mnist/$f" ] || { echo "error: Fashion-MNIST's $f not found (run scripts/setup.sh)" >&2; exit 1; }
done
bytes=$(du -sb "$DIR" | cut -f1)
echo "wheelhouse $DIR: $(ls "$DIR"/*.whl | wc -l) wheels + Fashion-MNIST, $((bytes / 1024)) KiB"
if [ "$bytes" -gt $((64 * 1024 * 1024)) ]; then
  echo "error: $DIR is over 64 MiB" >&2
  exit 1
fi
