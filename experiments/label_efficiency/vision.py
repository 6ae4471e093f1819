"""Does contrastive pre-training on unlabeled Fashion-MNIST cut the labels a ViT needs?

    .venv/bin/python experiments/label_efficiency/vision.py --jobs 2
    .venv/bin/python experiments/label_efficiency/vision.py --report-only

1. SimCLR (`task=simclr`: two augmented views, NT-Xent) pre-trains the default small ViT on the 57,000 training
   images, labels unused.
2. Arms, each fine-tuned with `stage=finetune` (epochs until the validation loss has not improved for --patience
   epochs, at most --max-epochs; the best checkpoint tested on the official 10,000 test images):
   - scratch: the ViT from random weights;
   - simclr: the same ViT from the SimCLR checkpoint.
   `seed=<s>` redraws the validation split (5 % of the training images, drawn at the labels' budget:
   data.val_labels=matched) and the few labels. The same learning-rate grid for both arms, plus layer-wise lr decay
   on/off for the pre-trained encoder, searched at 1 % and at 10 % (the first seed, on the validation loss); 100 %
   (where one grid point costs hours on a CPU core) reuses the point chosen at 10 %.
3. Beside them, logistic regression on the pixels of the same samples (classic.py, results_classic.json).
Results: results_vision.json (every run, grid points included), vision.md, vision.png; runs in
outputs/experiments/vision/. Scale up on a GPU with e.g. `--extra trainer=gpu model.size=small`.
"""

from __future__ import annotations

from common import HERE, ROOT, Study, parser, pretrain_summary, report, train

RUNS = ROOT / "outputs" / "experiments" / "vision"
RESULTS = HERE / "results_vision.json"
LRS = (7e-4, 2e-3, 6e-3)
ARMS = {
    "scratch": [{"lr": lr, "layer_decay": None} for lr in LRS],
    "simclr": [{"lr": lr, "layer_decay": ld} for lr in LRS for ld in (None, 0.75)],
}


def main() -> None:
    options = parser(__doc__, labels=["1%", "10%", "100%"], seeds_all_labels=[0])
    options.add_argument("--pretrain-steps", type=int, default=2000)
    args = options.parse_args()
    pretrained = RUNS / "simclr_pretrain"

    def overrides(arm: str, labels: str, seed: int, hp: dict) -> list[str]:
        return ["model=vit", "stage=finetune", f"seed={seed}"] + (
            [f"pretrained={pretrained}"] if arm == "simclr" else [])

    study = Study(RESULTS, RUNS, ARMS, overrides, args)
    if not args.report_only:
        if "simclr" in study.arms:  # only the arm that needs it pre-trains (a scratch-only driver can run beside)
            if not (pretrained / "checkpoints" / "last.ckpt").is_file():
                train(RUNS, "simclr_pretrain", [
                    "model=vit", "stage=pretrain", "task=simclr", f"trainer.max_steps={args.pretrain_steps}",
                    f"trainer.val_check_interval={max(1, args.pretrain_steps // 5)}", *args.extra])
            study.record("pretrain", "simclr", pretrain_summary(pretrained))
        study.run(grid_from={"100%": "10%"})
    title = "Fashion-MNIST: fmlab ViT arms vs pixel logistic regression"
    print(report(study, "vision", "pixels + LR", "vision", title))


if __name__ == "__main__":
    main()
