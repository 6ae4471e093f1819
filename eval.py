"""Test a checkpoint: python eval.py ckpt_path=<file> [data=<preset> ...] (see conf/eval.yaml)."""

import hydra
from omegaconf import DictConfig

import fmlab.config  # noqa: F401  (registers the resolvers and objective pairs the configs use)
from fmlab.cli import run


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> dict:
    from fmlab.evaluation import evaluate  # after composing: a bad option fails before the heavy imports

    return evaluate(cfg)


if __name__ == "__main__":
    run(main)
