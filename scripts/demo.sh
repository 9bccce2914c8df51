#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the main job: the whole study at the quick
# profile on real Fashion-MNIST with AlexNet (train with history, slice, mine, DARE / DARE-S /
# DARE-SL, five attacks and their fine-tuning baselines, evaluation, report). Rerunning it
# continues an interrupted study. Extra arguments go to reproduce.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
PYTHONUNBUFFERED=1 .venv/bin/python reproduce.py --dataset fashion_mnist --model alexnet \
  --profile quick "$@"
