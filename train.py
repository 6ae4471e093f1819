"""Train a foundation model: python train.py model=gpt stage=pretrain [key=value ...] (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from fmlab.cli import run
from fmlab.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    run(main)
