"""Seeds and determinism for a training run: the global RNGs, CUDA's deterministic
kernels, and the loader workers' own RNGs."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import torch

__all__ = ["seed_everything", "seed_worker", "use_deterministic_algorithms"]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device).

    CPU runs are then bit-reproducible; CUDA runs may still differ slightly because
    some cuDNN and atomic-add kernels are non-deterministic, unless
    :func:`use_deterministic_algorithms` is on (``train.deterministic``).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic_algorithms() -> None:
    """Make CUDA training repeatable run to run, at some speed cost.

    Turns on ``torch.use_deterministic_algorithms``, pins cuDNN to deterministic
    kernels without autotuning, and sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which
    cuBLAS needs for repeatable matrix products (read when its first handle is made, so
    call this before the first CUDA matmul). No effect on CPU results, which are
    already repeatable.

    ``warn_only``: torch flags the CUDA backward of ``AdaptiveAvgPool2d`` as
    non-deterministic and would raise on every backbone here; with the 1 x 1 output
    they use, each input position gets a single gradient contribution, so its result
    does not depend on the order of the atomic adds. Any other flagged op warns.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed a DataLoader worker's NumPy and Python RNGs, and leave
    SIGTERM/SIGINT to the main process.

    torch already seeds each worker with ``base_seed + worker_id`` (``base_seed`` is drawn
    from the loader's generator), but not NumPy or ``random``, which would otherwise
    repeat the parent's state in every worker.
    """
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
    # SIGTERM/SIGINT sent to the whole process group are the main process's to act on
    # (emonet.utils.stopping: stop between batches); a worker ended by them would instead fail
    # the batch being loaded. Workers still end with the loader, or within 5 s of the
    # main process's death (torch's watchdog on its parent).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
