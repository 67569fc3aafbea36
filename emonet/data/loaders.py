"""The one ``DataLoader`` factory, for training, validation and prediction alike.

It holds what every loader here shares (checked arguments, pinned memory on CUDA,
persistent workers only where there are workers); the training loop passes what is its
own (shuffling or a sampler, a seeded generator, worker seeding, ``drop_last``) as
arguments. Serving imports it without the training loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["close_workers", "make_loader"]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    shuffle: bool = False,
    sampler: Sampler | Sequence[int] | None = None,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
    worker_init_fn: Callable[[int], None] | None = None,
    persistent_workers: bool = False,
) -> DataLoader:
    """A ``DataLoader`` over ``dataset``, in order unless ``shuffle`` or ``sampler`` say otherwise.

    Parameters
    ----------
    dataset : e.g. an :class:`~emonet.data.dataset.EmoticDataset` or
        :class:`~emonet.inference.loop.ImageInputs`.
    batch_size : samples per batch, >= 1.
    num_workers : worker processes; 0 loads in the main process.
    device : where the batches go; page-locked (pinned) memory on CUDA speeds the copy.
    shuffle : reshuffle every epoch (the train split).
    sampler : the indices to draw, e.g. a ``DistributedSampler`` or one process's shard
        (then the order is the sampler's business and ``shuffle`` must be False).
    drop_last : drop the last incomplete batch.
    generator : the loader's ``torch.Generator``: the shuffling order and the workers'
        base seeds come from it.
    worker_init_fn : called in every worker with its id (e.g. to seed NumPy there).
    persistent_workers : keep the workers between epochs, which saves their start-up
        every epoch of a loader that is iterated again; ignored without workers.

    Raises
    ------
    ValueError
        For ``batch_size`` not a positive int, ``num_workers < 0``, or ``shuffle`` with
        a ``sampler``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if sampler is not None and shuffle:
        raise ValueError("pass shuffle=False with a sampler; the sampler decides the order")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=worker_init_fn if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0,
    )


def close_workers(loader: DataLoader) -> None:
    """Stop ``loader``'s persistent worker processes now (a no-op without workers).

    PyTorch stops them when the loader's iterator is freed. After an exception (a
    callback that ends training, such as a pruned sweep trial), the traceback keeps the
    loader alive in a reference cycle until the garbage collector runs; workers stopped
    from there were seen to outlive their trial (each one a process with a copy of the
    model). Training calls this on every way out instead."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is None:
        return
    loader._iterator = None
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:  # the multi-process iterator; the single-process one has nothing to stop
        shutdown()
