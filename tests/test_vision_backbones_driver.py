"""The vision-backbones experiment driver (experiments/vision_backbones/run.py) refuses a bad option before training."""

import subprocess
import sys
from pathlib import Path

RUN_PY = Path(__file__).resolve().parents[1] / "experiments" / "vision_backbones" / "run.py"


def test_a_label_fraction_above_one_is_refused_by_name() -> None:
    done = subprocess.run([sys.executable, str(RUN_PY), "--fractions", "2", "--arms", "vit_scratch"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "error: argument --fractions: 2 is not a share of the training labels in (0, 1]" in done.stderr
