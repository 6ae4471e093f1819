#!/usr/bin/env bash
# Semantic segmentation on easy-VQA at few masks (1 % and 10 % of the 3,600 training images): a ViT pre-trained
# with MAE on the training images (with and without MAE's per-patch pixel normalisation) vs the same ViT from
# scratch; a ResNet-18 U-Net from scratch; an EfficientNet-Lite0 U-Net from ImageNet weights. Every arm fine-tunes
# with task=segmentation's recipe, early stopping on val/miou, the best checkpoint tested on the 1,000 test images.
# Usage: bash experiments/segmentation/run.sh [out_dir]   -> <out_dir>/results.json, then results.md via report.py
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-outputs/experiments/segmentation}
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"0"}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-1500}
VIT=(model=vit model.patch_size=8 data=easy_vqa logger=csv)
mkdir -p "$OUT"
pretrain() {  # name, extra options
  local name=$1; shift
  if [ ! -f "$OUT/$name/checkpoints/last.ckpt" ]; then
    $PY train.py "${VIT[@]}" stage=pretrain trainer.max_steps=$PRETRAIN_STEPS trainer.val_check_interval=500 \
      data.batch_size=64 "$@" hydra.run.dir="$OUT/$name"
  fi
}
pretrain mae
pretrain mae_pix task.norm_pix_loss=false
for seed in $SEEDS; do
  for fraction in 0.01 0.1; do
    # epochs scale with the masks: 1 % is one step an epoch, 10 % six
    if [ "$fraction" = 0.01 ]; then budget=(trainer.max_epochs=200 callbacks.early_stopping.patience=40)
    else budget=(trainer.max_epochs=60 callbacks.early_stopping.patience=15); fi
    # the recorded runs count plain epochs (one step at 1 %), before validation rounds of 20 steps were the default
    common=(stage=finetune task=segmentation data.label_fraction=$fraction seed=$seed "${budget[@]}"
            callbacks.validation_rounds.min_steps=1)
    run() {  # arm, options
      local arm=$1; shift
      [ -f "$OUT/$arm-f$fraction-s$seed/test_metrics.json" ] || $PY train.py "$@" "${common[@]}" \
        hydra.run.dir="$OUT/$arm-f$fraction-s$seed"
    }
    run vit_mae "${VIT[@]}" pretrained="$OUT/mae"
    run vit_mae_pix "${VIT[@]}" pretrained="$OUT/mae_pix"
    run vit_scratch "${VIT[@]}" pretrained=null
    run resnet_scratch model=resnet data=easy_vqa logger=csv pretrained=null
    run efficientnet_imagenet model=efficientnet data=easy_vqa logger=csv
  done
done
$PY experiments/segmentation/report.py "$OUT"
