"""Sample text from a GPT checkpoint: python generate.py ckpt_path=<file> prompt="..." (see conf/generate.yaml)."""

import hydra
from omegaconf import DictConfig

import fmlab.config  # noqa: F401  (registers the resolvers and objective pairs the configs use)
from fmlab.cli import run


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    from fmlab.generation import generate  # after composing: a bad option fails before the heavy imports

    generate(cfg)


if __name__ == "__main__":
    run(main)
