"""What a believable few-label comparison needs from the framework: fine-tuning budgets in epochs with early
stopping by default, a validation split drawn at the training labels' size, and classic baselines (TF-IDF and pixel
logistic regression) on exactly the samples a run trains and tests on."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from fmlab.data.images import ImageDataModule
from fmlab.data.labeled_text import LabeledTextDataModule
from fmlab.data.sampling import VAL_MIN_PER_CLASS, few_label_indices, few_label_val_indices
from fmlab.errors import UserError
from fmlab.runtime import steps_between_validations
from tests.conftest import compose_config
from tests.image_data import write_image_folder
from tests.labeled_data import write_labeled_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "label_efficiency"))
baselines = pytest.importorskip("baselines")
pytest.importorskip("sklearn", reason="the classic baselines need scikit-learn (pip install -e '.[experiments]')")


# ---- budgets ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["bert", "gpt", "vit", "minilm"])
def test_finetuning_runs_in_epochs_until_validation_stops_improving(tmp_path: Path, model: str) -> None:
    cfg = compose_config([f"model={model}", "stage=finetune"], tmp_path)
    assert (cfg.trainer.max_steps, cfg.trainer.val_check_interval, cfg.trainer.check_val_every_n_epoch) == (-1, 1.0, 1)
    assert cfg.trainer.max_epochs >= 50
    assert cfg.callbacks.early_stopping.monitor == cfg.optimized_metric
    assert cfg.callbacks.model_checkpoint.monitor == cfg.optimized_metric and cfg.test_after_fit
    if model == "minilm":
        return  # pre-trained elsewhere: no pre-training stage
    pretrain = compose_config([f"model={model}", "stage=pretrain"], tmp_path)
    assert pretrain.trainer.max_steps > 0 and pretrain.trainer.max_epochs == -1, "pre-training keeps a step budget"


def test_a_step_interval_counts_steps_across_epochs() -> None:
    cfg = {"val_check_interval": 50, "check_val_every_n_epoch": 1}
    steps_between_validations(cfg)
    assert cfg["check_val_every_n_epoch"] is None
    cfg = {"val_check_interval": 1.0, "check_val_every_n_epoch": 1}
    steps_between_validations(cfg)
    assert cfg["check_val_every_n_epoch"] == 1


# ---- few-label validation --------------------------------------------------------------------------------------------


def test_validation_is_drawn_at_the_training_fraction_with_a_floor() -> None:
    labels = np.repeat(np.arange(4), [100, 100, 10, 3])
    val = few_label_val_indices(labels, 0.05, None, seed=0)
    assert np.bincount(labels[val]).tolist() == [5, 5, VAL_MIN_PER_CLASS, VAL_MIN_PER_CLASS]
    assert np.bincount(labels[few_label_val_indices(labels, None, 4, seed=0)]).tolist() == [4, 4, 4, 3]
    assert len(few_label_val_indices(labels, 0.05, None, seed=0, val_labels="all")) == len(labels)
    assert len(few_label_val_indices(labels, None, None, seed=0)) == len(labels), "all labels: all of val"
    assert np.bincount(labels[few_label_indices(labels, 0.05)]).tolist() == [5, 5, 1, 1]
    with pytest.raises(UserError, match="data.val_labels=some"):
        few_label_val_indices(labels, 0.05, None, seed=0, val_labels="some")


def text_module(tmp_path: Path, **kw) -> LabeledTextDataModule:
    dm = LabeledTextDataModule(source=str(write_labeled_csv(tmp_path / "labeled.csv", per_class=40)),
                               vocab_size=300, cache_dir=str(tmp_path / "cache"), **kw)
    dm.prepare_data()
    dm.setup()
    return dm


def test_few_label_text_validates_on_few_labels_and_tests_on_all(tmp_path: Path) -> None:
    full = text_module(tmp_path)
    few = text_module(tmp_path, labels_per_class=3)
    sizes = {s: len(few.datasets[s]) for s in ("train", "val", "test")}
    assert sizes == {"train": 15, "val": 15, "test": len(full.datasets["test"])}
    assert len(full.datasets["val"]) == 20
    assert len(text_module(tmp_path, labels_per_class=3, val_labels="all").datasets["val"]) == 20


def test_few_label_images_validate_on_few_labels_and_test_on_all(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images", n_per_class=50)
    common = {"source": str(root), "labeled": True, "val_fraction": 0.4, "cache_dir": str(tmp_path / "cache")}
    full, few = ImageDataModule(**common), ImageDataModule(**common, label_fraction=0.1)
    full.setup()
    few.setup()
    assert len(few.train_set) == 6 and len(few.val_set) == 4
    assert len(few.test_set) == len(full.test_set) == len(full.val_set) == 40, "no test split: the whole val"


# ---- classic baselines -----------------------------------------------------------------------------------------------


def test_text_baseline_reads_the_runs_sample_and_learns_the_topics(tmp_path: Path) -> None:
    dm = text_module(tmp_path, labels_per_class=4)
    splits = baselines.text_splits(dm)
    for s in ("train", "val", "test"):
        assert splits[s][1].tolist() == dm.datasets[s].labels().tolist(), s
    assert len(splits["train"][0]) == 20 and all(isinstance(t, str) for t in splits["train"][0])
    result = baselines.tfidf_logreg(splits)
    assert result["test/acc"] == 1.0 and result["C"] in baselines.C_GRID, result


def test_pixel_baseline_reads_the_runs_images(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images", n_per_class=40)
    dm = ImageDataModule(source=str(root), labeled=True, val_fraction=0.25, cache_dir=str(tmp_path / "cache"),
                         labels_per_class=10)
    splits = baselines.image_splits(dm)
    assert [len(splits[s][1]) for s in ("train", "val", "test")] == [20, 20, 20]
    assert splits["train"][0].dtype == np.uint8 and splits["train"][0].shape[1:] == (1, 28, 28)
    assert np.array_equal(splits["train"][1], dm.train_set.labels.numpy())


def test_pixel_baseline_separates_where_a_linear_model_can() -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(90) % 2
    images = rng.integers(0, 100, (90, 1, 8, 8)).astype(np.uint8)
    images[labels == 1, :, :, :4] += 120  # class 1 is bright on the left
    parts = {s: (images[i::3], labels[i::3]) for i, s in enumerate(("train", "val", "test"))}
    result = baselines.pixel_logreg(parts)
    assert result["test/acc"] == 1.0 and result["test/f1"] == 1.0, result


def test_the_validation_choice_of_c_is_the_best_on_val() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = (x[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(int)
    parts = {"train": (x[:100], y[:100]), "val": (x[100:150], y[100:150]), "test": (x[150:], y[150:])}
    best = baselines.logistic_regression(*parts.values(), grid=(1e-4, 1.0))
    assert best["C"] == 1.0 and best["val/acc"] > 0.7, best


def test_spread_over_seeds_is_the_sample_standard_deviation() -> None:
    from common import sample_std

    assert sample_std(np.array([1.0, 2.0, 3.0])) == pytest.approx(1.0)
    assert sample_std(np.array([5.0])) == 0.0


# ---- the experiment protocol (experiments/label_efficiency/common.py) ----------------------------------------------


def test_label_budgets_become_the_data_options() -> None:
    from common import label_overrides

    assert label_overrides("1%") == ["data.label_fraction=0.01"]
    assert label_overrides("16/class") == ["data.labels_per_class=16"]
    assert label_overrides("100%") == []


@pytest.mark.parametrize("argv", [["--labels", "3x"], ["--arms", "mae"]])
def test_a_bad_driver_option_is_a_one_line_error_naming_it(argv: list[str], tmp_path: Path, capsys) -> None:
    from common import Study, parser

    with pytest.raises(SystemExit) as stop:
        args = parser("", labels=["1%"], seeds_all_labels=[0]).parse_args(argv)
        Study(tmp_path / "results.json", tmp_path, {"scratch": [{"lr": 1e-3}]}, lambda *a: [], args)
    message = str(stop.value.code) if isinstance(stop.value.code, str) else capsys.readouterr().err.splitlines()[-1]
    assert "error: " in message and argv[0] in message


def write_metrics_csv(run_dir: Path, val_losses: list[float], steps_per_epoch: int, per_round: int = 1) -> None:
    (run_dir / "csv").mkdir(parents=True)
    lines = ["epoch,step,train/loss,val/loss", "0,0,,2.0"]  # the validation before fit
    for i, loss in enumerate(val_losses):
        epoch = (i + 1) * per_round - 1
        step = (epoch + 1) * steps_per_epoch - 1
        lines += [f"{epoch},{step},1.0,", f"{epoch},{step},,{loss}"]
    (run_dir / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_a_run_summary_says_how_long_it_trained_and_how_it_stopped(tmp_path: Path) -> None:
    from common import run_summary

    write_metrics_csv(tmp_path / "early", [1.0, 0.5, 0.7, 0.8], steps_per_epoch=5)
    assert run_summary(tmp_path / "early", max_epochs=10) == {
        "steps": 20, "epochs": 4, "epochs_per_round": 1, "best_epoch": 2, "val/loss": 0.5, "stopped": "early"}
    write_metrics_csv(tmp_path / "cap", [1.0, 0.9, 0.8], steps_per_epoch=2)
    assert run_summary(tmp_path / "cap", max_epochs=3)["stopped"] == "cap"
    # one step an epoch, validated every 20 epochs: 3 rounds of a 10-round cap is an early stop, 10 the cap
    write_metrics_csv(tmp_path / "rounds", [1.0, 0.5, 0.7], steps_per_epoch=1, per_round=20)
    assert run_summary(tmp_path / "rounds", max_epochs=10) == {
        "steps": 60, "epochs": 60, "epochs_per_round": 20, "best_epoch": 40, "val/loss": 0.5, "stopped": "early"}
    write_metrics_csv(tmp_path / "rounds_cap", [1.0] * 10, steps_per_epoch=1, per_round=20)
    assert run_summary(tmp_path / "rounds_cap", max_epochs=10)["stopped"] == "cap"


def test_cells_from_before_validation_rounds_are_marked() -> None:
    from common import PLAIN_EPOCHS, plain_epochs

    assert plain_epochs([{"epochs_per_round": 1}, {"epochs_per_round": 20}]) == ""
    assert PLAIN_EPOCHS in plain_epochs([{"epochs_per_round": 1}, {"steps": 17}])


def test_the_grid_point_kept_is_the_lowest_validation_loss_at_the_first_seed(tmp_path: Path) -> None:
    from common import Study, parser

    args = parser("", labels=["1%"], seeds_all_labels=[0]).parse_args([])
    grid = [{"lr": 1e-3}, {"lr": 1e-2}]
    study = Study(tmp_path / "results.json", tmp_path, {"arm": grid}, lambda *a: [], args)
    for seed, lr, loss in [(0, 1e-3, 0.9), (0, 1e-2, 0.4), (1, 1e-3, 0.1)]:
        study.results["runs"][f"{seed}-{lr}"] = {"arm": "arm", "labels": "1%", "seed": seed, "hp": {"lr": lr},
                                                 "val/loss": loss}
    assert study.chosen("arm", "1%") == {"lr": 1e-2}, "seed 1 does not choose"
    assert [r["seed"] for r in study.table_runs()[("arm", "1%")]] == [0], "the table averages the chosen point only"
    assert study.chosen("arm", "10%") is None


def test_a_budget_that_reuses_a_grid_point_trains_every_seed_at_once(tmp_path: Path) -> None:
    """No grid to choose from at 10 %: its seeds need not wait for the first one (two jobs meet at a barrier)."""
    from common import Study, parser

    args = parser("", labels=["10%"], seeds_all_labels=[0]).parse_args(["--seeds", "0", "1", "--jobs", "2"])
    study = Study(tmp_path / "results.json", tmp_path, {"arm": [{"lr": 1e-3}, {"lr": 1e-2}]}, lambda *a: [], args)
    study.results["runs"]["1pct"] = {"arm": "arm", "labels": "1%", "seed": 0, "hp": {"lr": 1e-2}, "val/loss": 0.4}
    together, trained = threading.Barrier(2, timeout=10), []

    def fine_tune(arm: str, labels: str, seed: int, hp: dict) -> None:
        together.wait()
        trained.append((labels, seed, hp["lr"]))

    study.fine_tune = fine_tune
    study.run(grid_from={"10%": "1%"})
    assert sorted(trained) == [("10%", 0, 1e-2), ("10%", 1, 1e-2)]


def test_the_cost_table_counts_how_the_seeds_stopped() -> None:
    from common import how_stopped

    assert how_stopped([{"stopped": "early"}] * 3) == "early"
    assert how_stopped([{"stopped": "early"}, {"stopped": "cap"}, {"stopped": "early"}]) == "2 early, 1 cap"


def test_two_drivers_sharing_a_results_file_keep_each_others_runs(tmp_path: Path) -> None:
    """One driver per arm (e.g. `--arms scratch` beside `--arms simclr`): each records into the file on disk, and a
    driver's stale copy of what the other rewrote (a re-run pre-training) does not overwrite the fresh one."""
    from common import Study, parser

    args = parser("", labels=["1%"], seeds_all_labels=[0]).parse_args([])
    path, arms = tmp_path / "results.json", {"scratch": [{"lr": 1e-3}], "simclr": [{"lr": 1e-3}]}
    path.write_text(json.dumps({"pretrain": {"simclr": {"minutes": 12.9}}, "runs": {}}))
    first, second = (Study(path, tmp_path, arms, lambda *a: [], args) for _ in range(2))  # both read the same file
    second.record("pretrain", "simclr", {"minutes": 12.1})
    first.record("runs", "scratch-run", {"arm": "scratch"})
    second.record("runs", "simclr-run", {"arm": "simclr"})
    on_disk = json.loads(path.read_text())
    assert set(on_disk["runs"]) == {"scratch-run", "simclr-run"}
    assert on_disk["pretrain"] == {"simclr": {"minutes": 12.1}}
    assert second.results == on_disk   # a driver keeps what is on disk, so its report shows the other's runs too
    assert first.results["pretrain"] == {"simclr": {"minutes": 12.1}}


@pytest.mark.parametrize(("driver", "arm_pretrained", "arm_not"), [("vision", "simclr", "scratch"),
                                                                    ("text", "bert_mlm", "scratch")])
def test_only_a_driver_with_the_pretrained_arm_pretrains(monkeypatch, tmp_path: Path, driver: str,
                                                         arm_pretrained: str, arm_not: str) -> None:
    """A scratch-only driver started beside the pre-training one must neither pre-train again nor record a summary."""
    import importlib

    import common

    module = importlib.import_module(driver)
    trained, recorded = [], []
    monkeypatch.setattr(module, "train", lambda runs, name, overrides, threads=None: trained.append(name))
    monkeypatch.setattr(module, "pretrain_summary", lambda run_dir: {"steps": 1})
    monkeypatch.setattr(module, "report", lambda *a, **k: "")
    monkeypatch.setattr(module, "RUNS", tmp_path)
    monkeypatch.setattr(common.Study, "run", lambda self, grid_from=None: None)
    monkeypatch.setattr(common.Study, "record", lambda self, section, key, value: recorded.append((section, key)))
    for arms, expect in (([arm_not], []), ([arm_pretrained], [("pretrain", arm_pretrained)])):
        trained.clear()
        recorded.clear()
        monkeypatch.setattr(sys, "argv", [driver, "--arms", *arms])
        module.main()
        assert recorded == expect
        assert len(trained) == len(expect)   # pre-trains only where the arm needs the checkpoint
