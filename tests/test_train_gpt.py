"""Tiny GPT pre-training end to end through the real configs: the loss falls, checkpoints round-trip."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from fmlab import training
from fmlab.tasks.base import param_groups, warmup_cosine
from fmlab.tasks.causal_lm import CausalLMTask
from fmlab.training import train
from tests.conftest import TINY_GPT, compose_config, read_metrics, values, write_corpus


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, CausalLMTask]:
    """One tiny pre-training run shared by the tests of this module: its folder, and the task train() fitted, as
    it stands in memory when training ends."""
    root = tmp_path_factory.mktemp("gpt")
    corpus = write_corpus(root / "corpus")
    tasks: list[CausalLMTask] = []
    build = training.build_task

    def build_and_keep(*args, **kwargs) -> CausalLMTask:
        tasks.append(build(*args, **kwargs))
        return tasks[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "build_task", build_and_keep)
        train(compose_config([*TINY_GPT, f"data.source={corpus}", f"paths.cache_dir={root / 'cache'}",
                              "trainer.max_steps=60"], root / "run"))
    (task,) = tasks
    return root / "run", task


@pytest.fixture(scope="module")
def trained_run(trained) -> Path:
    return trained[0]


def test_pretraining_lowers_validation_loss(trained_run: Path) -> None:
    val = values(read_metrics(trained_run), "val/loss")
    assert len(val) >= 2, "validation before training and during it"
    assert val[-1] < val[0] - 1.0, f"val/loss {val[0]:.2f} -> {val[-1]:.2f}"
    ppl = values(read_metrics(trained_run), "val/ppl")
    assert ppl[-1] < ppl[0] / 3
    assert values(read_metrics(trained_run), "train/loss") and values(read_metrics(trained_run), "lr")
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert (trained_run / "tokenizer.json").is_file()


def test_checkpoint_round_trip_gives_same_logits(trained) -> None:
    """The model training ended with, saved and loaded back (by Lightning, and by hand from the tensors alone),
    computes the same logits; the run's other checkpoint file (the best step's) does exactly when it is of step 60."""
    trained_run, fitted = trained
    fitted = fitted.cpu().eval()
    assert fitted.global_step == 60
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    task = CausalLMTask.load_from_checkpoint(ckpt, map_location="cpu").eval()
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)  # nothing pickled beyond tensors/containers
    assert "tokenizer" in raw["fmlab"] and raw["global_step"] == 60
    rebuilt = CausalLMTask(raw["hyper_parameters"]["model"], {}, {}).eval()
    rebuilt.load_state_dict(raw["state_dict"])
    (best,) = {p for p in (trained_run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"}
    other = CausalLMTask.load_from_checkpoint(best, map_location="cpu").eval()
    x = torch.randint(0, raw["hyper_parameters"]["model"]["vocab_size"], (2, 16))
    with torch.no_grad():
        logits = fitted.model(x)[0]
        assert torch.equal(task.model(x)[0], logits) and torch.equal(rebuilt.model(x)[0], logits)
        same = torch.equal(other.model(x)[0], logits)
    step = torch.load(best, map_location="cpu", weights_only=True)["global_step"]
    assert same == (step == 60), f"{best.name}, of step {step}"


def test_continuing_from_checkpoint_resumes_step(trained_run: Path, make_config, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 60
    corpus = trained_run.parent / "corpus"
    train(make_config([*TINY_GPT, f"data.source={corpus}", "trainer.max_steps=70", f"ckpt_path={ckpt}"], "resumed"))
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 70
    steps = [int(r["step"]) for r in read_metrics(tmp_path / "resumed") if r.get("train/loss")]
    assert min(steps) >= 60, "a continued run starts at the checkpoint's step, not at 0"


def test_schedule_warms_up_then_decays_to_floor() -> None:
    f = warmup_cosine(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_and_embeddings() -> None:
    from fmlab.models.gpt import GPTConfig

    model = GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8).build()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        "transformer.blocks.0.attn.qkv.weight", "transformer.blocks.0.attn.proj.weight",
        "transformer.blocks.0.mlp.fc.weight", "transformer.blocks.0.mlp.proj.weight",
    }
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "wte.weight" in {names[id(p)] for p in no_decay["params"]}


def fit_tiny_gpt(optimizer: dict, **trainer_args) -> L.Trainer:
    """Two steps of a tiny GPT on random tokens; returns the trainer."""
    model = {"_target_": "fmlab.models.gpt.GPTConfig", "vocab_size": 64, "block_size": 16, "n_layer": 1,
             "n_head": 2, "n_embd": 16}
    task = CausalLMTask(model, {"_target_": "torch.optim.AdamW", "lr": 1e-3, **optimizer}, {"warmup_steps": 1})
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_args)
    trainer.fit(task, DataLoader(torch.randint(0, 64, (16, 17)), batch_size=4))
    return trainer


def test_fused_adamw_is_clipped_under_bf16(monkeypatch) -> None:
    # Lightning's AMP plugin refuses to clip for any fused optimizer; bf16 gradients are unscaled, so fmlab clips.
    clipped: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm, *a, **kw: clipped.append(max_norm) or clip(params, max_norm, *a, **kw))
    trainer = fit_tiny_gpt({"fused": True}, precision="bf16-mixed", gradient_clip_val=0.5)
    assert trainer.global_step == 2 and trainer.optimizers[0].defaults["fused"]
    assert clipped == [0.5, 0.5]


def test_gradients_are_freed_after_each_optimizer_step() -> None:
    trainer = fit_tiny_gpt({}, accumulate_grad_batches=2)
    assert trainer.global_step == 2, "two optimizer steps of two accumulated batches each"
    assert all(p.grad is None for p in trainer.lightning_module.parameters())


def test_fp16_scaler_with_clipping_turns_fused_off() -> None:
    # A fused optimizer unscales fp16 gradients inside its step, too late for clipping: fmlab falls back.
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = fit_tiny_gpt({"fused": True}, plugins=[plugin], gradient_clip_val=1.0)
    assert trainer.optimizers[0].defaults["fused"] is False
