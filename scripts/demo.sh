#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the main job: a quick real training run of
# AlexNet on Fashion-MNIST (2,000 images, 50/50 split, 5 epochs; a few minutes on 2 CPU cores),
# saving every epoch into runs/demo-fashion_mnist-alexnet/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
RUN="${RUN_DIR:-runs/demo-fashion_mnist-alexnet}"
args=(--dataset fashion_mnist --subset 2000 --test-subset 1000 --epochs 5 --lr 0.01
      --milestones 4 --run-dir "$RUN")
[ -f "$RUN/config.json" ] && args+=(--resume)
.venv/bin/python train/alexnet.py "${args[@]}" "$@"
echo "history: $(ls "$RUN/history" | wc -l) epochs in $RUN/history; log: $RUN/train_log.csv"
cat "$RUN/train_log.csv"
