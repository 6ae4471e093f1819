"""Does MAE pre-training on unlabeled Fashion-MNIST cut the labels a ViT needs?

    OMP_NUM_THREADS=1 .venv/bin/python experiments/label_efficiency/vision.py

1. MAE pre-trains the default small ViT on the training images, labels unused (`--pretrain-steps`).
2. For each label fraction and seed, the same fine-tuning budget (`--finetune-steps`): full fine-tuning from the MAE
   encoder, the same ViT from random weights (with and without layer-wise lr decay), and MAE's linear probe.
3. Test accuracy and macro F1 on the official 10,000 test images go to results_vision.json (after every run; a rerun
   skips what is done), vision.md and vision.png. Run folders: outputs/experiments/vision/.

Scale up on a GPU with e.g. `--extra trainer=gpu model.size=small`.
"""

from __future__ import annotations

import json

from common import HERE, ROOT, parser, report, sweep, train

RUNS = ROOT / "outputs" / "experiments" / "vision"
RESULTS = HERE / "results_vision.json"
# scratch uses the fine-tuning recipe as is (layer-wise lr decay 0.75); scratch_flat_lr trains all layers at one lr,
# the fairer from-scratch baseline.
ARMS = ["mae_finetune", "scratch", "scratch_flat_lr", "mae_linear_probe"]


def main() -> None:
    options = parser(__doc__, fractions=[0.01, 0.05, 0.1, 1.0], pretrain_steps=3000, finetune_steps=300)
    args = options.parse_args()

    def show(results: dict) -> None:
        report(results, ARMS, "vision", "ViT on Fashion-MNIST: MAE pre-training vs scratch",
               "fraction of the 57,000 training labels used")

    if args.report_only:
        show(json.loads(RESULTS.read_text()))
        return
    pretrained = RUNS / "mae_pretrain"
    if not (pretrained / "checkpoints" / "last.ckpt").is_file():
        train(RUNS, "mae_pretrain", ["model=vit", "stage=pretrain", f"trainer.max_steps={args.pretrain_steps}",
                                     f"trainer.val_check_interval={max(1, args.pretrain_steps // 5)}", *args.extra])

    def overrides(arm: str, fraction: float, seed: int) -> list[str]:
        base = ["experiment=vit_linear_probe"] if arm == "mae_linear_probe" else ["model=vit", "stage=finetune"]
        out = [*base, f"seed={seed}", f"trainer.max_steps={args.finetune_steps}",
               f"trainer.val_check_interval={max(1, args.finetune_steps // 3)}", *args.extra]
        if fraction < 1:
            out.append(f"data.label_fraction={fraction}")
        if arm.startswith("mae"):
            out.append(f"pretrained={pretrained}")
        if arm == "scratch_flat_lr":
            out.append("task.layer_decay=null")
        return out

    sweep(RESULTS, RUNS, ARMS, args.fractions, args.seeds, overrides, show, args.jobs)


if __name__ == "__main__":
    main()
