"""Sample text from a GPT checkpoint: python generate.py ckpt_path=<file> prompt="..." (see conf/generate.yaml)."""

import hydra
from omegaconf import DictConfig

from fmlab.cli import run
from fmlab.generation import generate


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    run(main)
