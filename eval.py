"""Test a checkpoint: python eval.py ckpt_path=<file> [data=<preset> ...] (see conf/eval.yaml)."""

import hydra
from omegaconf import DictConfig

from fmlab.cli import run
from fmlab.evaluation import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> dict:
    return evaluate(cfg)


if __name__ == "__main__":
    run(main)
