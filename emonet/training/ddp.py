"""The ``torch.distributed`` process group of a data-parallel job, as training sees it:
joining it, this process's rank and device, unpadded validation shards, and gathering
predictions and values across ranks.

Outside a process group every function answers as for a single process (rank 0 of 1),
so the training loop calls them unconditionally. Launching the job and the worker
``torchrun`` starts live in :mod:`emonet.training.launcher`, above the training loop.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from emonet.config import EmoNetConfig
from emonet.inference.loop import Predictions
from emonet.models.devices import resolve_device

__all__ = [
    "all_gather_objects",
    "all_ranks_finite",
    "all_reduce_sum",
    "broadcast_module",
    "gather_predictions",
    "is_distributed",
    "process_device",
    "process_group",
    "rank",
    "resolve_backend",
    "shard_indices",
    "world_size",
]


def is_distributed() -> bool:
    """True inside an initialized process group (a torchrun worker)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` picks nccl on CUDA and gloo on the CPU; nccl on the CPU is refused."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(
            f"train.distributed.backend='nccl' needs CUDA, but this run is on {device}; use 'gloo' or 'auto'"
        )
    if backend not in {"nccl", "gloo"}:
        raise ValueError(f"unknown train.distributed.backend {backend!r}; expected 'auto', 'nccl' or 'gloo'")
    return backend


def process_device(device: torch.device) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` for a CUDA worker (one GPU per process)."""
    if device.type != "cuda" or not is_distributed():
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank() % torch.cuda.device_count())))


@contextlib.contextmanager
def process_group(config: EmoNetConfig) -> Iterator[None]:
    """Join the job torchrun describes in the environment (``WORLD_SIZE`` > 1), leave it on exit.

    A no-op for a single process, or when a process group is already initialized (the
    caller then owns it, e.g. a test using ``torch.multiprocessing.spawn``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        yield
        return
    device = resolve_device(config.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(resolve_backend(config.train.distributed.backend, device))
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard_indices(length: int) -> range:
    """This rank's share of an ordered split: every ``world_size``-th sample from ``rank``.

    Unlike ``DistributedSampler`` it pads nothing, so every sample is predicted exactly
    once across ranks and the gathered mean loss is exact; shards may differ by one.
    """
    size = world_size()
    if length < size:
        raise ValueError(f"the validation split has {length} samples, fewer than the {size} processes")
    return range(rank(), length, size)


def gather_predictions(predictions: Predictions) -> Predictions:
    """Every rank's predictions, merged in dataset order on every rank.

    Rows are de-duplicated by dataset index (a padding sampler such as
    ``DistributedSampler`` repeats a few), so metrics cover the whole split exactly
    once. Mean losses are weighted by each shard's row count. Outside a process group
    the predictions are returned unchanged.
    """
    if not is_distributed():
        return predictions
    shards: list[Predictions | None] = [None] * world_size()
    dist.all_gather_object(shards, predictions)
    parts = [shard for shard in shards if shard is not None]
    indices = np.concatenate([part.indices for part in parts])
    unique, first = np.unique(indices, return_index=True)  # sorted by dataset index

    def merged(name: str) -> np.ndarray | None:
        arrays = [getattr(part, name) for part in parts]
        return None if arrays[0] is None else np.concatenate(arrays)[first]

    losses = None
    if parts[0].losses is not None:
        total = sum(len(part) for part in parts)
        losses = {key: sum(part.losses[key] * len(part) for part in parts) / total for key in parts[0].losses}
    return Predictions(
        emotion_prob=merged("emotion_prob"),
        affect_pred=merged("affect_pred"),
        indices=unique,
        emotions_true=merged("emotions_true"),
        affect_true=merged("affect_true"),
        losses=losses,
    )


def all_ranks_finite(value: torch.Tensor) -> bool:
    """Whether ``value`` (a scalar) is finite on every rank, so all ranks stop together."""
    check = value.detach().float().reshape(1).clone()
    if is_distributed():
        dist.all_reduce(check)  # a NaN or inf anywhere makes the sum non-finite
    return math.isfinite(check.item())


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (a one-element list outside a group)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into ``module`` on every rank, in place."""
    if is_distributed():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)
