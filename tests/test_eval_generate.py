"""eval.py reproduces the test metrics the training run reported for its checkpoint; generate.py samples text."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from fmlab.errors import UserError
from fmlab.evaluation import evaluate
from fmlab.generation import generate_text, load_generator
from fmlab.training import train
from tests.conftest import CONF_DIR, TINY_GPT, compose_config, write_corpus

ROOT = Path(__file__).resolve().parents[1]


def compose_entry(name: str, overrides: list[str], output_dir: Path):
    """Compose conf/<name>.yaml (eval, generate) as its entry point would, with the run folder set."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return cfg


def assert_eval_reproduces(run_dir: Path, keys: tuple[str, ...], output_dir: Path) -> None:
    """eval.py on the checkpoint a run tested gives the test metrics the run wrote (its cache beside the run)."""
    from fmlab.evaluation import evaluate

    reported = json.loads((run_dir / "test_metrics.json").read_text())
    cfg = compose_entry("eval", [f"ckpt_path={reported['checkpoint']}", f"paths.cache_dir={run_dir.parent / 'cache'}",
                                 "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false"], output_dir)
    metrics = evaluate(cfg)
    for key in keys:
        assert metrics[key] == pytest.approx(reported["metrics"][key], rel=1e-5), key


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalgen")
    corpus = write_corpus(root / "corpus", n_docs=30)
    train(compose_config([*TINY_GPT, f"data.source={corpus}", f"paths.cache_dir={root / 'cache'}",
                          "trainer.max_steps=10", "trainer.val_check_interval=5", "++test_after_fit=true"],
                         root / "run"))
    return root / "run"


def test_eval_reproduces_the_training_runs_test_metrics(run: Path) -> None:
    reported = json.loads((run / "test_metrics.json").read_text())
    assert set(reported["metrics"]) >= {"test/loss", "test/ppl"}
    out = run.parent / "eval"
    cfg = compose_entry("eval", [f"ckpt_path={reported['checkpoint']}", f"paths.cache_dir={run.parent / 'cache'}",
                                 "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false"], out)
    metrics = evaluate(cfg)
    for key, value in reported["metrics"].items():
        assert metrics[key] == pytest.approx(value, rel=1e-6), key
    written = json.loads((out / "test_metrics.json").read_text())
    assert written["metrics"] == metrics and written["checkpoint"] == reported["checkpoint"]

    # The same data named through a preset: the split seed and tokenizer still come from the training run.
    cfg = compose_entry("eval", [f"ckpt_path={reported['checkpoint']}", f"paths.cache_dir={run.parent / 'cache'}",
                                 "data=text_files", f"data.source={run.parent / 'corpus'}", "trainer.accelerator=cpu",
                                 "+trainer.enable_progress_bar=false"], run.parent / "eval_preset")
    assert evaluate(cfg) == pytest.approx(metrics, rel=1e-6)


def test_eval_is_generic_over_tasks(tmp_path: Path) -> None:
    """A fine-tuned classifier: eval.py finds its task class and data in the checkpoint, reports accuracy/F1."""
    from tests.labeled_data import write_labeled_csv

    labeled = write_labeled_csv(tmp_path / "labeled.csv", per_class=12)
    train(compose_config([*TINY_GPT, "stage=finetune", f"data.source={labeled}", f"paths.cache_dir={tmp_path / 'c'}",
                          "trainer.max_steps=6", "trainer.val_check_interval=6"], tmp_path / "run"))
    reported = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    cfg = compose_entry("eval", [f"ckpt_path={reported['checkpoint']}", f"paths.cache_dir={tmp_path / 'c'}",
                                 "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false"], tmp_path / "eval")
    metrics = evaluate(cfg)
    assert "test/acc" in metrics
    assert metrics == pytest.approx(reported["metrics"], rel=1e-6)


def test_eval_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    cfg = compose_entry("eval", [f"ckpt_path={tmp_path / 'none.ckpt'}"], tmp_path / "eval")
    with pytest.raises(UserError, match="ckpt_path=.*none.ckpt: no such file"):
        evaluate(cfg)


def test_generation_returns_the_requested_number_of_tokens(run: Path) -> None:
    model, tokenizer = load_generator(run / "checkpoints" / "last.ckpt")
    samples = generate_text(model, tokenizer, "the market", max_new_tokens=12, temperature=0.8, top_k=20,
                            num_samples=3, seed=0, stop_at_eos=False)
    assert [len(s["token_ids"]) for s in samples] == [12, 12, 12]
    assert all(isinstance(s["text"], str) for s in samples)
    again = generate_text(model, tokenizer, "the market", max_new_tokens=12, temperature=0.8, top_k=20,
                          num_samples=3, seed=0, stop_at_eos=False)
    assert again == samples, "a seed makes sampling repeatable"
    greedy = generate_text(model, tokenizer, "", max_new_tokens=5, temperature=0, stop_at_eos=False)
    assert len(greedy[0]["token_ids"]) == 5
    with pytest.raises(ValueError, match="block_size"):
        generate_text(model, tokenizer, "the market", max_new_tokens=64)


def test_generate_py_writes_samples(run: Path, tmp_path: Path) -> None:
    argv = sys.argv
    sys.argv = ["generate.py", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "prompt=the market",
                "max_new_tokens=8", "stop_at_eos=false", "num_samples=2", f"hydra.run.dir={tmp_path / 'gen'}"]
    GlobalHydra.instance().clear()
    try:
        runpy.run_path(str(ROOT / "generate.py"), run_name="__main__")
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    written = json.loads((tmp_path / "gen" / "samples.json").read_text())
    assert written["prompt"] == "the market"
    assert [len(s["token_ids"]) for s in written["samples"]] == [8, 8]
