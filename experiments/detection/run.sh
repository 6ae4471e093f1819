#!/usr/bin/env bash
# Tree-crown detection on deepforest's airborne images (data=deepforest): EfficientNet-Lite0 from its ImageNet
# weights vs the same network from random weights, each under Faster R-CNN with an FPN (task=detection), early
# stopping on val/map_50 (SOAP_061), the best checkpoint tested on OSBS_029 (61 trees, another site).
# SOURCE=easy_vqa IMG_SIZE=null IMAGE_FRACTION=0.05 VAL_FRACTION=0.1 BATCH=8: the same two arms on easy-VQA's shapes as boxes.
# Usage: bash experiments/detection/run.sh [out_dir]   -> <out_dir>/results.json
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-outputs/experiments/detection}
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"0"}
# 400 px tiles resized to 256 (trees of 6-40 px) and a narrower box head: a CPU budget; drop both on a GPU.
COMMON=(stage=finetune task=detection data=deepforest data.source=${SOURCE:-deepforest}
        data.image_fraction=${IMAGE_FRACTION:-null} data.val_fraction=${VAL_FRACTION:-0.2} data.batch_size=${BATCH:-4}
        logger=csv model.img_size=${IMG_SIZE:-256}
        task.box_head_width=${BOX_HEAD_WIDTH:-256} trainer.max_epochs=${EPOCHS:-30}
        callbacks.early_stopping.patience=${PATIENCE:-10}
        callbacks.validation_rounds.min_steps=${MIN_STEPS:-1})  # recorded runs: plain epochs of 14 steps
mkdir -p "$OUT"
for seed in $SEEDS; do
  for arm in imagenet scratch; do
    weights=(); [ "$arm" = scratch ] && weights=(pretrained=null)
    [ -f "$OUT/efficientnet_$arm-s$seed/test_metrics.json" ] || \
      $PY train.py model=efficientnet "${COMMON[@]}" "${weights[@]}" seed=$seed hydra.run.dir="$OUT/efficientnet_$arm-s$seed"
  done
done
$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {}
for run in sorted(out.glob("*-s*")):
    if (run / "test_metrics.json").is_file():
        metrics = json.loads((run / "test_metrics.json").read_text())["metrics"]
        throughput = json.loads((run / "throughput.json").read_text())
        best = next((run / "checkpoints").glob("best-step*.ckpt"))
        runs[run.name] = {**metrics, "steps": throughput["steps"], "seconds": round(throughput["wall_seconds"]),
                          "best_step": int(best.stem.removeprefix("best-step"))}
(out / "results.json").write_text(json.dumps(runs, indent=2))
print(json.dumps(runs, indent=2))
PYEOF
