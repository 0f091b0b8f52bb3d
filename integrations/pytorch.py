"""Plain PyTorch adapters: make a DataLoader resumable, find what a loop's state is.

``recoverkit.protect`` uses these; they are public for loops that drive a
:class:`~recoverkit.Checkpointer` themselves.

A DataLoader's own samplers (``RandomSampler``/``SequentialSampler``) cannot resume
mid-epoch, and its worker seeds come from the global RNG at the moment an epoch's iterator
is created. :func:`resumable_loader` rebuilds the loader over the same dataset with a
:class:`~recoverkit.ResumableSampler` (seeded per epoch) and a generator reseeded per epoch,
so the order of samples and the workers' base seeds depend only on ``(seed, epoch)``, and a
run resumed mid-epoch sees exactly the batches the uninterrupted run saw. Datasets whose
``__getitem__`` draws random numbers should derive them from the sample index (as worker
assignment after a resume starts afresh).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

from recoverkit.state import DataPosition, ResumableSampler

__all__ = ["resumable_loader", "EpochSeededLoader"]


class EpochSeededLoader:
    """A DataLoader whose sampling and worker seeds depend only on ``(seed, epoch)``.

    Iterating it yields the current epoch's remaining batches (from the sampler's position).
    """

    def __init__(self, loader: DataLoader, sampler: ResumableSampler, seed: int) -> None:
        self.loader = loader
        self.sampler = sampler
        self.seed = seed
        self.batch_size = loader.batch_size

    def __iter__(self) -> Any:
        self.loader.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.sampler.epoch)
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def resumable_loader(loader: DataLoader, *, seed: int = 0, rank: int = 0, world_size: int = 1) -> tuple[EpochSeededLoader, DataPosition]:
    """Rebuild ``loader`` to resume exactly; return it and the position to checkpoint.

    Example:
        >>> ds = torch.utils.data.TensorDataset(torch.arange(10.0))
        >>> loader, position = resumable_loader(DataLoader(ds, batch_size=4, shuffle=True))
        >>> [len(b[0]) for b in loader]
        [4, 4, 2]
    """
    if loader.batch_size is None:
        raise ValueError("resumable_loader needs a DataLoader with a batch_size (automatic batching)")
    sampler = loader.sampler
    if not isinstance(sampler, ResumableSampler):
        shuffle = isinstance(sampler, RandomSampler)
        sampler = ResumableSampler(
            loader.dataset, shuffle=shuffle, seed=seed, num_replicas=world_size, rank=rank, drop_last=False
        )
    kwargs: dict[str, Any] = dict(
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=False,
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
        kwargs["multiprocessing_context"] = loader.multiprocessing_context
    rebuilt = DataLoader(loader.dataset, **kwargs)
    return EpochSeededLoader(rebuilt, sampler, seed), DataPosition(sampler)
