"""data=streaming (fmlab/data/streaming.py): a corpus tokenized once into many litdata token shards, streamed in
windows of the memory-mapped corpus's tokens; a corpus far larger than the loader's cache streams with flat memory;
the loader resumes mid-epoch exactly, alone and through Lightning's checkpoint; ranks read disjoint windows; and
train.py trains on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from fmlab.data.streaming import StreamingCorpusDataModule, streaming_dataset, streaming_loader, write_shards
from fmlab.data.text_corpus import TextCorpusDataModule
from fmlab.training import train
from tests.conftest import TINY_GPT, compose_config, read_metrics, values, write_corpus
from tests.test_ddp import StepLosses, step_losses

ROOT = Path(__file__).resolve().parents[1]
BLOCK, SHARD_TOKENS, BATCH = 32, 256, 8  # 7 windows of 33 tokens per 256-token shard


class StepBatches(StepLosses):
    """StepLosses, plus every training batch of each rank in <folder>/batches<r>.jsonl (`[step, batch]` lines)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        with open(self.folder / f"batches{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps([trainer.global_step, batch.tolist()]) + "\n")


def record(folder: Path) -> list[str]:
    return [f"+callbacks.step_batches._target_={__name__}.StepBatches", f"+callbacks.step_batches.folder={folder}"]


def recorded(folder: Path, rank: int = 0) -> dict[int, list]:
    lines = (folder / f"batches{rank}.jsonl").read_text().splitlines()
    return {step: batch for step, batch in map(json.loads, lines)}


class Ranks:
    """What the data module reads from a trainer: rank r of `world` processes on `nodes` nodes."""

    def __init__(self, world: int, rank: int, nodes: int) -> None:
        self.world_size, self.global_rank, self.num_nodes = world, rank, nodes


def windows(loader) -> list[tuple[int, ...]]:
    return [tuple(row) for batch in loader for row in batch.tolist()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("streaming") / "corpus", n_docs=30)


def make_module(corpus: Path, cache: Path, **options) -> StreamingCorpusDataModule:
    module = StreamingCorpusDataModule(source=str(corpus), vocab_size=300, block_size=BLOCK, batch_size=BATCH,
                                       cache_dir=str(cache), chunk_size=SHARD_TOKENS, **options)
    module.prepare_data()
    return module


def test_corpus_is_written_as_many_shards_of_the_memmap_tokens(corpus: Path, tmp_path: Path) -> None:
    module = make_module(corpus, tmp_path / "cache")
    folder = module.cache_path
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "shards", "tokenizer.json"], "no flat files"
    shards = sorted((folder / "shards" / "train").glob("chunk-*.bin"))
    assert len(shards) > 30 and len(list((folder / "shards" / "val").glob("chunk-*.bin"))) >= 1
    assert module.describe().model == {"vocab_size": 300} and module.describe().max_length == BLOCK

    # The tokens are the memory-mapped corpus's (same split, tokenizer, order): shard k holds tokens
    # [256k, 256k + 256) and serves the windows at offsets 33j inside it.
    memmap = TextCorpusDataModule(source=str(corpus), vocab_size=300, block_size=BLOCK, cache_dir=str(tmp_path))
    memmap.setup()
    tokens = memmap.train_set.tokens
    expected = {tuple(int(t) for t in tokens[s + j * (BLOCK + 1): s + (j + 1) * (BLOCK + 1)])
                for s in range(0, len(tokens), SHARD_TOKENS) for j in range(min(SHARD_TOKENS, len(tokens) - s) //
                                                                             (BLOCK + 1))}
    loader = module.train_dataloader()
    batch = next(iter(loader))
    assert batch.shape == (BATCH, BLOCK + 1) and batch.dtype == torch.int64
    epoch = windows(loader)
    assert len(epoch) == len(loader) * BATCH == len(expected) // BATCH * BATCH, "drop_last: whole batches"
    assert len(set(epoch)) == len(epoch) and set(epoch) <= expected, "each window once, all from the corpus"
    in_order = windows(module.loader("train", shuffle=False, drop_last=True))
    assert set(in_order) <= expected and epoch != in_order, "shuffled"
    assert windows(loader) != epoch, "a fresh order each epoch"
    val = windows(module.val_dataloader())
    assert val == windows(module.val_dataloader()), "validation in order"


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_mid_epoch_exactly(corpus: Path, tmp_path: Path, workers: int) -> None:
    """The loader's state after k batches, loaded into a fresh loader, continues with the uninterrupted run's
    batches k+1..: the same windows in the same order, the workers' round robin included."""
    module = make_module(corpus, tmp_path / "cache", num_workers=workers)
    full = [b.clone() for b in module.train_dataloader()]
    interrupted = module.train_dataloader()
    it = iter(interrupted)
    first = [next(it).clone() for _ in range(5)]
    state = interrupted.state_dict()
    del it
    resumed = module.train_dataloader()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    rest = [b.clone() for b in resumed]
    assert len(first) + len(rest) == len(full)
    for i, (got, want) in enumerate(zip(first + rest, full, strict=True)):
        assert torch.equal(got, want), f"batch {i}"


def test_ranks_and_nodes_read_disjoint_windows(corpus: Path, tmp_path: Path) -> None:
    """Two ranks (one per node) split the epoch: no window twice, as many batches each (DDP steps in lockstep)."""
    module = make_module(corpus, tmp_path / "cache")
    single = set(windows(module.train_dataloader()))
    per_rank = []
    for rank in (0, 1):
        module.trainer = Ranks(world=2, rank=rank, nodes=2)
        per_rank.append(windows(module.train_dataloader()))
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    assert not set(per_rank[0]) & set(per_rank[1]), "disjoint"
    assert set(per_rank[0]) | set(per_rank[1]) <= single
    assert len(per_rank[0]) * 2 >= len(single) - 2 * BATCH * 2, "together they cover the epoch (drop_last aside)"


def directory_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def test_corpus_far_larger_than_the_cache_streams_with_flat_memory(tmp_path: Path) -> None:
    """64 MB of tokens in 1 MB shards, read as from an object store (`local:`: each shard downloaded into a cache
    capped at 4 MB, consumed shards evicted): the process's RSS grows by less than 16 MB over the whole stream, the
    cache never exceeds its budget, and every window is served."""
    n, window = 32 * 2**20, 1024
    np.random.default_rng(0).integers(0, 50_000, n, dtype=np.uint16).tofile(tmp_path / "tokens.bin")
    shards = write_shards(tmp_path / "tokens.bin", "uint16", f"local:{tmp_path / 'shards'}", None, "1MB")
    (tmp_path / "tokens.bin").unlink()
    assert shards >= 60
    dataset = streaming_dataset(f"local:{tmp_path / 'shards'}", window - 1, tmp_path / "cache", seed=0,
                                max_cache_size="4MB")
    process, rss, cache, served = psutil.Process(), [], [], 0
    for i, batch in enumerate(streaming_loader(dataset, batch_size=32)):
        served += len(batch)
        if i % 16 == 0:
            rss.append(process.memory_info().rss)
            cache.append(directory_bytes(tmp_path / "cache"))
    assert served == len(dataset) == n // window, "every window once (shards hold whole 8192-token pieces)"
    growth = (max(rss) - rss[0]) / 2**20
    assert growth < 16, f"RSS grew by {growth:.1f} MB streaming 64 MB"
    assert max(cache) <= 4 * 2**20 + 2**20, f"the download cache held {max(cache) / 2**20:.1f} MB"


def test_train_py_streams_lowers_the_loss_and_resumes_through_the_checkpoint(
    corpus: Path, tmp_path: Path, one_thread,
) -> None:
    """`train.py model=gpt data=streaming`: the loss falls; the step-4 checkpoint (mid-epoch: 32 batches an epoch)
    holds the loader's position, and a run resumed from it trains on the uninterrupted run's batches 5-8 and logs
    its losses."""
    overrides = [o for o in TINY_GPT if not o.startswith("data.")] + [
        "model=gpt", "data=streaming", f"data.source={corpus}", f"data.chunk_size={SHARD_TOKENS}",
        "data.vocab_size=300", f"data.batch_size={BATCH}", f"paths.cache_dir={tmp_path / 'cache'}",
        "trainer.max_steps=8", "trainer.val_check_interval=4", "callbacks.model_checkpoint.save_top_k=-1",
    ]
    run = tmp_path / "full"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "train.py", *overrides, *record(tmp_path / "full_steps"),
                           f"hydra.run.dir={run}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    val = values(read_metrics(run), "val/loss")
    assert len(val) == 3 and val[-1] < val[0] - 0.1, f"validation loss falls: {val}"
    full_losses, full_batches = step_losses(tmp_path / "full_steps", 0), recorded(tmp_path / "full_steps")
    assert full_losses[8] < full_losses[1]

    ckpt = torch.load(run / "checkpoints" / "best-step4.ckpt", weights_only=False)
    (position,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert position["num_samples_yielded"] == 4 * BATCH and position["current_epoch"] == 1

    train(compose_config([*overrides, *record(tmp_path / "resumed_steps"),
                          f"ckpt_path={run / 'checkpoints' / 'best-step4.ckpt'}"], tmp_path / "resumed"))
    resumed_batches = recorded(tmp_path / "resumed_steps")
    assert sorted(resumed_batches) == [5, 6, 7, 8]
    assert all(resumed_batches[s] == full_batches[s] for s in resumed_batches), "the batches after the checkpoint"
    resumed_losses = step_losses(tmp_path / "resumed_steps", 0)
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(full_losses[step], abs=1e-5), f"step {step}"


def test_two_ddp_ranks_stream_disjoint_batches(corpus: Path, tmp_path: Path) -> None:
    """trainer=ddp_cpu data=streaming: Lightning leaves the iterable loader alone (no distributed sampler) and
    each rank streams its own windows, step for step."""
    overrides = [o for o in TINY_GPT if not o.startswith(("data.", "trainer.devices"))] + [
        "data=streaming", f"data.source={corpus}", f"data.chunk_size={SHARD_TOKENS}", "data.vocab_size=300",
        "data.batch_size=4", f"paths.cache_dir={tmp_path / 'cache'}", "trainer=ddp_cpu", "trainer.max_steps=3",
        "trainer.val_check_interval=3", "validate_before_fit=false",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "train.py", *overrides, *record(tmp_path / "steps"),
                           f"hydra.run.dir={tmp_path / 'ddp'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ranks = [recorded(tmp_path / "steps", rank) for rank in (0, 1)]
    assert sorted(ranks[0]) == sorted(ranks[1]) == [1, 2, 3]
    rows = [{tuple(row) for step in r.values() for row in step} for r in ranks]
    assert len(rows[0]) == len(rows[1]) == 12 and not rows[0] & rows[1]
