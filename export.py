"""Export a checkpoint as a Hugging Face folder: python export.py ckpt_path=<file> out_dir=<dir> (conf/export.yaml)."""

import hydra
from omegaconf import DictConfig

from fmlab.cli import run
from fmlab.interop.export import export


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    run(main)
