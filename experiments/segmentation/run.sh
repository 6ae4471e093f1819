#!/usr/bin/env bash
# Semantic segmentation on easy-VQA at few masks (1 % and 10 % of the 3,600 training images): a ViT pre-trained
# on the training images with MAE (with and without MAE's per-patch pixel normalisation) or SimCLR vs the same ViT
# from scratch; a ResNet-18 U-Net from scratch; an EfficientNet-Lite0 U-Net from ImageNet weights. Every arm
# fine-tunes with the shipped recipe (stage=finetune task=segmentation: validation rounds of at least 20 steps,
# early stopping on val/miou, at most 100 rounds), the best checkpoint tested on the 1,000 test images.
# Usage: [SEEDS="0 1 2"] [FRACTIONS="0.01 0.1"] [ARMS="vit_scratch ..."] bash experiments/segmentation/run.sh [out_dir]
#   -> <out_dir>/results.json and a table via report.py. Two drivers with disjoint ARMS can share out_dir.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-outputs/experiments/segmentation}
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1 2"}
FRACTIONS=${FRACTIONS:-"0.01 0.1"}
ALL_ARMS="vit_mae vit_mae_pix vit_simclr vit_scratch resnet_scratch efficientnet_imagenet"
ARMS=${ARMS:-$ALL_ARMS}
for arm in $ARMS; do
  [[ " $ALL_ARMS " == *" $arm "* ]] || { echo "error: ARMS: no arm $arm; the arms are $ALL_ARMS" >&2; exit 2; }
done
PRETRAIN_STEPS=${PRETRAIN_STEPS:-1500}
VIT=(model=vit model.patch_size=8 data=easy_vqa logger=csv)
mkdir -p "$OUT"
selected() { [[ " $ARMS " == *" $1 "* ]]; }
pretrain() {  # arm that needs it, run name, extra options
  local arm=$1 name=$2; shift 2
  if selected "$arm" && [ ! -f "$OUT/$name/checkpoints/last.ckpt" ]; then
    $PY train.py "${VIT[@]}" stage=pretrain trainer.max_steps=$PRETRAIN_STEPS trainer.val_check_interval=500 \
      data.batch_size=64 "$@" hydra.run.dir="$OUT/$name"
  fi
}
pretrain vit_mae mae
pretrain vit_mae_pix mae_pix task.norm_pix_loss=false
pretrain vit_simclr simclr task=simclr
for seed in $SEEDS; do
  for fraction in $FRACTIONS; do
    run() {  # arm, options
      local arm=$1; shift
      selected "$arm" || return 0
      [ -f "$OUT/$arm-f$fraction-s$seed/test_metrics.json" ] || $PY train.py "$@" stage=finetune task=segmentation \
        data.label_fraction="$fraction" seed="$seed" hydra.run.dir="$OUT/$arm-f$fraction-s$seed"
    }
    run vit_mae "${VIT[@]}" pretrained="$OUT/mae"
    run vit_mae_pix "${VIT[@]}" pretrained="$OUT/mae_pix"
    run vit_simclr "${VIT[@]}" pretrained="$OUT/simclr"
    run vit_scratch "${VIT[@]}" pretrained=null
    run resnet_scratch model=resnet data=easy_vqa logger=csv pretrained=null
    run efficientnet_imagenet model=efficientnet data=easy_vqa logger=csv
  done
done
$PY experiments/segmentation/report.py "$OUT"
