"""Data pipeline: tokenizer speed, loader speed against the training step, and memory on a 10x corpus.

    .venv/bin/python benchmarks/data_pipeline.py [--step-tokens-per-s N]

- tokenizer MB/s: BPE training and batch encoding of the BBC News corpus;
- loader tokens/s: batches served by TextCorpusDataModule's train loader (memory map), and by data=streaming's
  (StreamingCorpusDataModule: litdata token shards of 1 MB), compared with what a training step consumes (pass the
  fmlab tokens/s measured by benchmarks/throughput.py, default: read its JSON);
- peak RSS of `train.py` (tokens already cached) on the corpus and on a 10x larger one.

Writes experiments/benchmarks/data_pipeline.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fmlab.data.sources import read_texts
from fmlab.data.streaming import StreamingCorpusDataModule
from fmlab.data.text_corpus import TextCorpusDataModule
from fmlab.data.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "benchmarks"


def tokenizer_speed(texts: list[str]) -> dict:
    mb = sum(len(t.encode()) for t in texts) / 1e6
    start = time.perf_counter()
    tok = train_bpe(texts, 8192)
    trained = time.perf_counter() - start
    start = time.perf_counter()
    tok.encode_batch(texts, add_special_tokens=False)
    encoded = time.perf_counter() - start
    return {"corpus_mb": mb, "train_mb_per_s": mb / trained, "encode_mb_per_s": mb / encoded}


def loader_speed(batches: int, batch_size: int, block_size: int, cache_dir: str, streaming: bool = False) -> float:
    """Tokens/s the training loader serves (one process, no workers): the memory map, or the token shards."""
    if streaming:
        dm = StreamingCorpusDataModule(block_size=block_size, batch_size=batch_size, cache_dir=cache_dir,
                                       chunk_size=2**19)  # 1 MB shards of uint16 tokens
    else:
        dm = TextCorpusDataModule(block_size=block_size, batch_size=batch_size, cache_dir=cache_dir)
    dm.prepare_data()
    dm.setup()
    loader = dm.train_dataloader()

    def endless():
        while True:
            yield from loader

    stream = endless()
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch_size * block_size / (time.perf_counter() - start)


def peak_rss_mb(source: str, cache_dir: str, steps: int) -> float:
    """Peak RSS of a short `train.py` run whose token cache already exists (a first run builds it)."""
    cmd = [
        sys.executable, str(ROOT / "train.py"), f"data.source={source}", f"paths.cache_dir={cache_dir}",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=2",
        "logger=csv", "callbacks=none", "validate_before_fit=false", f"hydra.run.dir={tempfile.mkdtemp()}",
    ]
    subprocess.run(cmd, check=True, capture_output=True)  # builds the cache
    proc = subprocess.Popen(cmd[:-1] + [f"hydra.run.dir={tempfile.mkdtemp()}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, in KiB
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-tokens-per-s", type=float, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = read_texts("bbc_news")
    result = {"threads": args.threads, "tokenizer": tokenizer_speed(texts)}

    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "cache")
        result["loader_tokens_per_s"] = loader_speed(200, 16, 256, cache)
        result["streaming_loader_tokens_per_s"] = loader_speed(200, 16, 256, cache, streaming=True)
        step_tps = args.step_tokens_per_s
        bench = OUT / "gpt-bf16-mixed-t2.json"
        if step_tps is None and bench.is_file():
            step_tps = json.loads(bench.read_text())["results"]["fmlab"]["per_s"]
        if step_tps:
            result["step_tokens_per_s"] = step_tps
            result["loader_over_consumption"] = result["loader_tokens_per_s"] / step_tps

        big = Path(tmp) / "bbc_x10.jsonl"
        with big.open("w") as f:  # ten distinct copies, so de-duplication keeps them all
            for copy in range(10):
                for t in texts:
                    f.write(json.dumps({"text": f"{t}\n(copy {copy})"}) + "\n")
        rss_1 = peak_rss_mb("bbc_news", cache, args.steps)
        rss_10 = peak_rss_mb(str(big), cache, args.steps)
        result["peak_rss_mb"] = {"corpus_x1": rss_1, "corpus_x10": rss_10, "ratio": rss_10 / rss_1}

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "data_pipeline.json").write_text(json.dumps(result, indent=2))
    t = result["tokenizer"]
    lines = [
        "| measure | value |", "|---|---|",
        f"| corpus size | {t['corpus_mb']:.1f} MB |",
        f"| BPE training | {t['train_mb_per_s']:.2f} MB/s |",
        f"| batch encoding | {t['encode_mb_per_s']:.2f} MB/s |",
        f"| loader (memory map) | {result['loader_tokens_per_s']:,.0f} tokens/s |",
        f"| loader (data=streaming, 1 MB shards) | {result['streaming_loader_tokens_per_s']:,.0f} tokens/s |",
    ]
    if "loader_over_consumption" in result:
        lines.append(f"| loader / training step consumption | {result['loader_over_consumption']:.0f}x |")
    r = result["peak_rss_mb"]
    lines.append(f"| peak RSS, corpus x1 / x10 | {r['corpus_x1']:.0f} / {r['corpus_x10']:.0f} MB ({r['ratio']:.2f}x) |")
    (OUT / "data_pipeline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
