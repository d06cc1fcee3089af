#!/usr/bin/env bash
# The real-data grid behind bench/report/ and the real-data tables in bench/RESULTS.md.
# Everything is cached under runs/paper (releases shared by all cells that use them):
# re-running continues where it stopped, and a finished cell is never recomputed.
#
#   bash bench/paper_grid.sh breast      # lane 1: BreastMNIST (one core)
#   bash bench/paper_grid.sh speed       # lane 2: the protection-speed table (the other core) ...
#   bash bench/paper_grid.sh pneumonia   # ... then PneumoniaMNIST
#   bash bench/paper_grid.sh report      # the tables and the report from whatever finished
#
# On this 2-core CPU each lane runs single-threaded so that two lanes share the machine.
# PneumoniaMNIST victims train 5 epochs (4708 images; ResNet-18 ~70 images/s per core),
# BreastMNIST victims 15 (546 images).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SF=${SF:-.venv/bin/salm-fast}
ROOT=${ROOT:-runs/paper}
DATA=${DATA:-../shared/data/medmnist}
B=$DATA/breastmnist.npz
P=$DATA/pneumoniamnist.npz
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1

case "${1:-}" in
breast)
  # ResNet-18: clean, random, SALM K sweep, the anti-learning perturbations.
  $PY -m bench real --root "$ROOT" --datasets breastmnist --epochs 15
  # Counter-measures on ResNet-18 against SALM K = 20%.
  $SF experiment --root "$ROOT" --datasets "$B" --methods salm:k=0.2 --victims resnet18 --epochs 15 \
      --defenses cutout mixup cutmix jpeg-10 jpeg-50 jpeg-90 blur bitdepth-4 iss
  # The zoo: every victim on clean data and on SALM at K = 20%.
  $SF experiment --root "$ROOT" --datasets "$B" --methods clean salm:k=0.2 \
      --victims cnn vgg11 vit densenet121 --epochs 15
  # Baselines on ResNet-18, and protecting selected classes only.
  $SF experiment --root "$ROOT" --datasets "$B" --methods tap ops lsp salm:k=0.2,classes=0 \
      --victims resnet18 --epochs 15
  # Ablation: saliency window 1 (single pixels) instead of 5.
  $SF experiment --root "$ROOT" --datasets "$B" --methods salm:k=0.2,saliency_window=1 \
      --victims resnet18 cnn --epochs 15
  # Adversarial training (5-step PGD, ~6x the cost of a victim): the attacker's trade-off.
  $SF experiment --root "$ROOT" --datasets "$B" --methods salm:k=0.2 clean --victims resnet18 --epochs 15 \
      --defenses adv-8 adv-4
  ;;
speed)
  # Speed: the classic error-minimizing loop vs ours, side by side (CNN victim).
  $PY -m bench speed
  ;;
pneumonia)
  # ResNet-18, 5 epochs: clean, random, SALM (and its single-pixel saliency variant),
  # the anti-learning perturbations.
  $PY -m bench real --root "$ROOT" --datasets pneumoniamnist --epochs 5 --ks 0.1 0.2 \
      --extra salm:k=0.2,saliency_window=1
  # The small CNN, 15 epochs: the K sweep, saliency window 5 (default) and 1, the other methods.
  $SF experiment --root "$ROOT" --datasets "$P" --methods clean salm:k=0.2 salm:k=0.2,saliency_window=1 \
      salm:k=0.1 random salm:k=0.5 salm:k=0.05 samplewise classwise generator --victims cnn --epochs 15
  # Class-combined: protected Breast classes mixed with clean Pneumonia classes.
  $SF experiment --root "$ROOT" --datasets "combine:$B+$P" --methods clean salm:k=0.2,classes=0\|1 \
      --victims cnn --epochs 15
  $SF experiment --root "$ROOT" --datasets "$P" --methods clean salm:k=0.2 --victims vgg11 vit --epochs 5
  ;;
report)
  $PY -m bench real --root "$ROOT" --datasets breastmnist pneumoniamnist --tabulate-only
  $SF report --root "$ROOT" --out bench/report
  ;;
*)
  echo "usage: bash bench/paper_grid.sh breast|speed|pneumonia|report" >&2
  exit 2
  ;;
esac
