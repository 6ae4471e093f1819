"""Export a checkpoint as a Hugging Face folder: python export.py ckpt_path=<file> out_dir=<dir> (conf/export.yaml)."""

import hydra
from omegaconf import DictConfig

import fmlab.config  # noqa: F401  (registers the resolvers and objective pairs the configs use)
from fmlab.cli import run


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from fmlab.interop.export import export  # after composing: a bad option fails before the heavy imports

    export(cfg)


if __name__ == "__main__":
    run(main)
