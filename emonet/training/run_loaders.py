"""The train and validation datasets and loaders of a training run, built from the
config's presets: seeded, and split between processes inside a torchrun process group.
They are made with :func:`emonet.data.loaders.make_loader`, the one DataLoader factory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from emonet.config import EmoNetConfig
from emonet.data.dataset import EmoticDataset
from emonet.data.loaders import make_loader
from emonet.inference.loop import eval_transform
from emonet.models.devices import resolve_device
from emonet.models.encoders import config_transforms
from emonet.training import ddp
from emonet.training.seeding import seed_worker

__all__ = ["build_datasets", "make_loaders"]


def build_datasets(
    train: pd.DataFrame | str | Path,
    val: pd.DataFrame | str | Path,
    img_dir: str | Path,
    config: EmoNetConfig,
) -> tuple[EmoticDataset, EmoticDataset]:
    """Train and validation datasets with the presets of ``config``.

    Parameters
    ----------
    train, val : validated annotation DataFrames or CSV paths (original or normalized).
    img_dir : folder of the ``.npy`` arrays.
    config : run config; ``train.image_size``, ``train.augment`` and (for the
        ``body_context`` variant, which also loads the full image) ``train.context_size``.

    Returns
    -------
    (train_dataset, val_dataset)
    """
    with_context = config.model.uses_context
    train_transform = config_transforms(config, train=True)
    return (
        EmoticDataset(train, img_dir, transform=train_transform, with_context=with_context),
        EmoticDataset(val, img_dir, transform=eval_transform(config), with_context=with_context),
    )


def make_loaders(
    train: pd.DataFrame | str | Path,
    val: pd.DataFrame | str | Path,
    img_dir: str | Path,
    config: EmoNetConfig,
    device: str | torch.device | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders for :func:`~emonet.training.trainer.fit` (see :func:`build_datasets`).

    The train loader shuffles and, as timm does, drops the last incomplete batch so
    BatchNorm never normalizes over a batch of one (a split smaller than one batch
    is kept whole). The validation loader keeps every sample, in order.

    Both are reproducible: the shuffling order and the workers' seeds come from each
    loader's own ``torch.Generator`` (``loader.generator``), seeded with ``train.seed``,
    and :func:`~emonet.training.seeding.seed_worker` seeds NumPy and ``random`` in every worker.
    :func:`~emonet.training.trainer.fit` saves and restores the generators' states, so a resumed run
    draws the same batches.
    ``train.num_workers`` workers are persistent (kept between epochs, which saves their
    start-up every epoch). With workers, a resumed run gets the same batches but fresh
    worker RNGs, so its augmentation draws differ from an uninterrupted run; with 0
    workers the resume is exact.

    Inside a process group (a torchrun worker) each process gets its part of the data:
    a ``DistributedSampler`` over train (one shared permutation per epoch, seeded with
    ``train.seed``; :func:`~emonet.training.trainer.fit` calls ``set_epoch``) and an unpadded shard of
    val (:func:`emonet.training.ddp.shard_indices`). ``train.batch_size`` is then per
    process, and each process's loader generator (worker seeds) is offset by its rank.

    Parameters
    ----------
    device : where training runs (pinned memory on CUDA); defaults to
        ``config.train.device`` resolved.
    """
    device = resolve_device(config.train.device if device is None else device)
    train_dataset, val_dataset = build_datasets(train, val, img_dir, config)
    tc = config.train
    train_sampler: DistributedSampler | None = None
    val_shard: range | None = None
    if ddp.is_distributed():
        train_sampler = DistributedSampler(train_dataset, shuffle=True, seed=tc.seed)
        val_shard = ddp.shard_indices(len(val_dataset))
    samples_per_process = len(train_sampler) if train_sampler is not None else len(train_dataset)

    def loader(dataset: Dataset, **order: Any) -> DataLoader:
        return make_loader(
            dataset,
            tc.batch_size,
            num_workers=tc.num_workers,
            device=device,
            generator=torch.Generator().manual_seed(tc.seed + ddp.rank()),
            worker_init_fn=seed_worker,
            persistent_workers=True,
            **order,
        )

    train_loader = loader(
        train_dataset,
        shuffle=train_sampler is None,
        sampler=train_sampler,
        drop_last=samples_per_process > tc.batch_size,
    )
    return train_loader, loader(val_dataset, sampler=val_shard)
