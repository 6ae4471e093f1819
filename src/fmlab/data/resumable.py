"""Training loaders that resume mid-epoch by jumping to their position, not by replaying batches.

The loader counts the batches it has handed to the training loop; Lightning stores that count in each checkpoint
(the loader implements `state_dict`/`load_state_dict`) and, on resume, the sampler starts its epoch's permutation at
that offset. Nothing before the offset is loaded, so resuming late in a long epoch costs no more than starting one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """A seeded per-epoch shuffle, sharded across ranks, that can begin `start` samples into its shard.

    A `DistributedSampler` subclass, so Lightning keeps it under DDP instead of substituting its own. Rank r of R
    takes every R-th index of the same permutation, so R ranks with micro-batch b see, step for step, the samples
    that one process with batch R*b sees.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0  # samples of this rank's shard to skip, once (set on resume)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch (batches served) is saved in checkpoints and restored by a jump."""

    _position = 0  # batches of the current epoch handed out
    _resume_at = 0  # batches to skip on the next iteration

    def __iter__(self) -> Iterator[Any]:
        # A generator, so the sampler is read at the first batch, after Lightning has set the epoch.
        sampler = self.sampler
        skip, self._resume_at = self._resume_at, 0
        if skip and isinstance(sampler, ResumableSampler):
            sampler.start = skip * self.batch_size
        self._position = skip
        for batch in super().__iter__():
            self._position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(getattr(self.sampler, "epoch", 0)), "batches": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        batches = int(state.get("batches", 0))
        if not isinstance(self.sampler, ResumableSampler):
            raise RuntimeError("a ResumableDataLoader can only resume with a ResumableSampler")
        epoch = int(state.get("epoch", 0))
        if batches >= len(self):  # saved on the last batch of an epoch: the next epoch starts afresh
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self._resume_at = batches


def resumable_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
    num_workers: int = 0, trainer: Any = None, **kwargs: Any,
) -> ResumableDataLoader:
    """The training DataLoader of a data module: resumable mid-epoch and sharded by the trainer's rank."""
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return ResumableDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed), **kwargs,
    )
