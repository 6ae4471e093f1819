"""Checkpoint files that are either whole or absent: write beside the target, then rename over it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_scratch(path: Path) -> None:
    """Delete `<name>.tmp-<pid>` files of `path` whose writer is gone (killed mid-write): each can be as large as a
    checkpoint. A live writer's file (another rank or process) is left alone."""
    for scratch in path.parent.glob(f"{path.name}.tmp-*"):
        pid = scratch.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
            scratch.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to `<name>.tmp-<pid>` in the same folder, fsync, then `os.replace`.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in the system temp folder;
    when that is another file system the final move is a copy, and a kill during the copy leaves a truncated
    `last.ckpt`. A rename within one folder is atomic: a reader sees the old file or the new one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_scratch(path)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
