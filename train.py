"""Train a foundation model: python train.py model=gpt stage=pretrain [key=value ...] (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

import fmlab.config  # noqa: F401  (registers the resolvers and objective pairs the configs use)
from fmlab.checks import check_data_source
from fmlab.cli import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    check_data_source(cfg)  # a mistyped data path fails before the heavy imports, as a bad option does
    from fmlab.training import train  # after composing: a bad option fails before the heavy imports

    return train(cfg)


if __name__ == "__main__":
    run(main)
