#!/usr/bin/env bash
# The protection protocol of the README's results table and bench/report/report.md (issue 9):
# victims trained from scratch on the stored release with crop + flip, BreastMNIST 30 epochs,
# PneumoniaMNIST 15, every split perturbed (the default), test AUC and the protection AUC
# max(AUC, 1 - AUC), seeds 0 1 2 where the lane says so (the seed is the release's and the victim's).
# Cached and resumable under $ROOT: rerun a lane to continue it; a finished cell is never recomputed.
#
#   bash bench/protocol.sh breast      # CNN and ResNet-18, 3 seeds; VGG-11 and ViT, 1 seed
#   bash bench/protocol.sh pneumonia   # CNN, 3 seeds
#   bash bench/protocol.sh ablation    # SALM's parts: mask placement, code, training, rounds (CNN)
#   bash bench/protocol.sh counter     # the counter-measures (CNN, seed 0)
#   bash bench/protocol.sh more        # the rest of the issue's protocol (not run yet: hours of this CPU)
#   bash bench/protocol.sh report      # bench/report/ from whatever finished
#
# On the 2-core CPU each lane runs on one thread, so two lanes share the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
SF=${SF:-.venv/bin/salm-fast}
ROOT=${ROOT:-runs/protocol}
DATA=${DATA:-../shared/data/medmnist}
B=$DATA/breastmnist.npz
P=$DATA/pneumoniamnist.npz
EPOCHS=breastmnist=30,pneumoniamnist=15
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
run() { $SF experiment --root "$ROOT" --epochs "$EPOCHS" "$@"; }

case "${1:-}" in
breast)
  run --datasets "$B" --methods clean salm --victims cnn resnet18 --seeds 0 1 2
  run --datasets "$B" --methods clean salm --victims vit vgg11 --seeds 0
  ;;
pneumonia)
  run --datasets "$P" --methods clean salm --victims cnn --seeds 0 1 2
  ;;
more)  # not run yet on the 2-core CPU (a ResNet-18 PneumoniaMNIST victim: ~45 minutes there)
  run --datasets "$B" --methods clean salm --victims densenet121 --seeds 0
  run --datasets "$P" --methods clean salm --victims resnet18 vgg11 densenet121 vit --seeds 0 1 2
  run --datasets "$B" --methods salm --victims resnet18 --seeds 0 \
      --defenses jpeg-10 jpeg-50 blur iss cutout mixup cutmix bitdepth-4 best-val purify
  ;;
ablation)
  run --datasets "$B" --victims cnn --seeds 0 1 2 \
      --methods salm:train=false salm:code=false salm:mask=image salm:mask=class
  run --datasets "$B" --victims cnn --seeds 0 --methods salm:rounds=1
  run --datasets "$P" --victims cnn --seeds 0 --methods salm:train=false salm:code=false salm:rounds=1
  ;;
counter)
  run --datasets "$B" --methods salm --victims cnn --seeds 0 \
      --defenses jpeg-10 blur best-val purify jpeg-50 cutout mixup cutmix bitdepth-4 iss
  run --datasets "$P" --methods salm --victims cnn --seeds 0 --defenses jpeg-10 blur best-val
  ;;
report)
  $SF report --root "$ROOT" --out bench/report
  ;;
*)
  echo "usage: bash bench/protocol.sh breast|pneumonia|ablation|counter|more|report" >&2
  exit 2
  ;;
esac
