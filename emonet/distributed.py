"""Distributed data-parallel training with ``torchrun``: the process group, sharded
validation gathered across ranks, the launcher and the worker it starts.

The worker is this module: ``torchrun`` starts ``python -m emonet.distributed`` once per
process, each joins the process group from the environment torchrun sets (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and calls
:func:`emonet.train.train_from_csvs`, the same entry point as a single-process run.
:func:`launch_training` builds the ``torchrun`` command from ``train.distributed``, streams
its output line by line to a callback and raises when any rank fails.

Rank 0 alone writes checkpoints, calls the epoch callbacks and shows progress. Metrics
logged from inside the job go straight to MLflow: the launcher passes the run id and
tracking URI, and rank 0 logs each epoch with :func:`mlflow_epoch_logger`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from emonet.checkpoint import resolve_device
from emonet.config import DistributedConfig, EmoNetConfig, config_to_dict, load_config
from emonet.io import atomic_open
from emonet.prediction import Predictions

if TYPE_CHECKING:
    from emonet.train import FitResult

logger = logging.getLogger(__name__)

__all__ = [
    "all_gather_objects",
    "all_ranks_finite",
    "all_reduce_sum",
    "broadcast_module",
    "gather_predictions",
    "is_distributed",
    "launch_training",
    "main",
    "mlflow_epoch_logger",
    "process_device",
    "process_group",
    "rank",
    "resolve_backend",
    "shard_indices",
    "torchrun_command",
    "world_size",
]

CONFIG_FILENAME = "distributed_config.yaml"  # the resolved config the workers read, beside the checkpoints
LOG_TAIL_LINES = 60  # lines of the job's output quoted in the error when it fails


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
        raise ValueError(f"train.distributed.backend='nccl' needs CUDA, but this run is on {device}; use 'gloo' or 'auto'")
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


# --------------------------------------------------------------------------- MLflow


def mlflow_epoch_logger(run_id: str) -> Callable[[dict[str, float]], None]:
    """An epoch callback that logs the finite metrics to MLflow run ``run_id`` at step ``epoch``.

    Uses ``MlflowClient`` with the tracking URI of the environment
    (``MLFLOW_TRACKING_URI``), which :func:`launch_training` passes to the workers.
    """
    from mlflow.tracking import MlflowClient

    from emonet.tracking import log_metrics

    client = MlflowClient()

    def log(metrics: dict[str, float]) -> None:
        log_metrics(client, run_id, metrics, step=int(metrics["epoch"]))

    return log


# --------------------------------------------------------------------------- launcher


def torchrun_command(distributed: DistributedConfig, worker_args: Sequence[str]) -> list[str]:
    """The ``torchrun`` command line (as ``python -m torch.distributed.run``) for the worker.

    One machine without an endpoint uses ``--standalone`` (torchrun picks a free local
    port); otherwise a c10d rendezvous at ``rdzv_endpoint`` that every machine joins.
    """
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={distributed.nnodes}", f"--nproc_per_node={distributed.nproc_per_node}",
    ]
    if distributed.rdzv_endpoint is None:
        command.append("--standalone")
    else:
        command += ["--rdzv_backend=c10d", f"--rdzv_endpoint={distributed.rdzv_endpoint}",
                    f"--rdzv_id={distributed.rdzv_id}"]
    return [*command, "-m", "emonet.distributed", *worker_args]


def launch_training(
    config: EmoNetConfig,
    train_csv: str | Path,
    val_csv: str | Path,
    img_dir: str | Path,
    checkpoint_dir: str | Path,
    *,
    resume_from: str | Path | None = None,
    normalization_json: str | Path | None = None,
    mlflow_run_id: str | None = None,
    on_line: Callable[[str], Any] = logger.info,
) -> FitResult:
    """Train with ``torchrun`` as ``train.distributed`` says, and wait for it.

    The resolved config is written to ``checkpoint_dir/distributed_config.yaml``; the
    job's output (every rank's log) goes line by line to ``on_line``.

    Parameters
    ----------
    config : the run config; ``train.batch_size`` is per process.
    train_csv, val_csv, img_dir : as for :func:`emonet.train.train_from_csvs`.
    checkpoint_dir : where rank 0 writes ``last.pt`` and ``best.pt``.
    resume_from : a ``last.pt`` (single-process or distributed) to continue from.
    normalization_json : the ``AffectNormalizer`` of the targets, for the 1..10 errors.
    mlflow_run_id : rank 0 logs every epoch's metrics to this run, at the tracking URI
        this process uses.
    on_line : receives each output line (e.g. a Prefect run logger's ``info``).

    Returns
    -------
    FitResult
        Read back from the checkpoints the job wrote.

    Raises
    ------
    RuntimeError
        When torchrun exits non-zero (any rank failed), with the tail of the output.
    """
    from emonet.train import read_fit_result

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    config_path = checkpoint_dir / CONFIG_FILENAME
    with atomic_open(config_path) as handle:
        yaml.safe_dump(config_to_dict(config), handle, sort_keys=False)
    worker_args = [
        "--config", str(config_path), "--train-csv", str(train_csv), "--val-csv", str(val_csv),
        "--img-dir", str(img_dir), "--checkpoint-dir", str(checkpoint_dir), "--no-progress",
    ]
    if resume_from is not None:
        worker_args += ["--resume-from", str(resume_from)]
    if normalization_json is not None:
        worker_args += ["--normalization", str(normalization_json)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if mlflow_run_id is not None:
        import mlflow

        worker_args += ["--mlflow-run-id", mlflow_run_id]
        # The job's processes must reach the same store as this one, however it was set.
        env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    command = torchrun_command(config.train.distributed, worker_args)
    tc = config.train
    logger.info(
        "launching %d x %d processes, batch %d per process (effective batch %d): %s",
        tc.distributed.nnodes, tc.distributed.nproc_per_node, tc.batch_size,
        tc.batch_size * tc.distributed.world_size, " ".join(command),
    )
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
        env=env,
    ) as process:
        try:
            assert process.stdout is not None  # set by stdout=PIPE
            for line in process.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                on_line(line)
            returncode = process.wait()
        finally:
            if process.poll() is None:  # interrupted (e.g. a cancelled task): stop the whole job
                process.terminate()
                process.wait()
    if returncode != 0:
        raise RuntimeError(
            f"distributed training failed: torchrun exited with code {returncode}; last output:\n" + "\n".join(tail)
        )
    return read_fit_result(checkpoint_dir)


# --------------------------------------------------------------------------- worker


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m emonet.distributed", description="one torchrun training worker")
    parser.add_argument("--config", type=Path, required=True, help="YAML config (the launcher writes it)")
    parser.add_argument("--train-csv", type=Path, required=True)
    parser.add_argument("--val-csv", type=Path, required=True)
    parser.add_argument("--img-dir", type=Path, required=True)
    parser.add_argument("--checkpoint-dir", type=Path, required=True)
    parser.add_argument("--resume-from", type=Path, default=None, help="a last.pt to continue from")
    parser.add_argument("--normalization", type=Path, default=None, help="normalization.json of the targets")
    parser.add_argument("--mlflow-run-id", default=None, help="rank 0 logs each epoch to this MLflow run")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one torchrun worker process."""
    from emonet.normalize import AffectNormalizer
    from emonet.train import train_from_csvs

    args = _parse_args(argv)
    worker_rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        # Other ranks would repeat rank 0's lines; they report only problems.
        level=logging.INFO if worker_rank == 0 else logging.WARNING,
        format=f"%(asctime)s rank {worker_rank} %(levelname)s %(name)s: %(message)s",
    )
    config = load_config(args.config)
    bounds = None
    if args.normalization is not None:
        normalizer = AffectNormalizer.load(args.normalization)
        bounds = (normalizer.low, normalizer.high)
    callbacks = [mlflow_epoch_logger(args.mlflow_run_id)] if args.mlflow_run_id and worker_rank == 0 else []
    result = train_from_csvs(
        args.train_csv, args.val_csv, args.img_dir, config, args.checkpoint_dir,
        callbacks=callbacks, resume_from=args.resume_from, affect_bounds=bounds, progress=args.progress,
    )
    if worker_rank == 0:
        logger.info("best val mAP %.4f at epoch %d: %s", result.best_metric, result.best_epoch, result.best_checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
