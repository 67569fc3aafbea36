"""Distributed data-parallel training with ``torchrun``: the launcher and the worker it starts.

The worker is this module: ``torchrun`` starts ``python -m emonet.training.launcher`` once per
process, each joins the process group from the environment torchrun sets (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and calls
:func:`emonet.training.trainer.train_from_csvs`, the same entry point as a single-process run.
:func:`launch_training` builds the ``torchrun`` command from ``train.distributed``, streams
its output line by line to a callback and raises when any rank fails. What the
training loop needs inside the job (ranks, shards, gathering) is :mod:`emonet.training.ddp`.

Rank 0 alone writes checkpoints, calls the epoch callbacks and shows progress. Metrics
logged from inside the job go straight to MLflow: the launcher passes the run id and
tracking URI, and rank 0 logs each epoch with :func:`mlflow_epoch_logger`.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient

from emonet.config import DistributedConfig, EmoNetConfig, config_to_dict, load_config
from emonet.data.normalize import AffectNormalizer
from emonet.tracking.run_logging import log_metrics
from emonet.training.run_state import FitResult, read_fit_result
from emonet.training.trainer import train_from_csvs
from emonet.utils.io import atomic_open

logger = logging.getLogger(__name__)

__all__ = [
    "launch_training",
    "main",
    "mlflow_epoch_logger",
    "torchrun_command",
]

CONFIG_FILENAME = "distributed_config.yaml"  # the resolved config the workers read, beside the checkpoints
LOG_TAIL_LINES = 60  # lines of the job's output quoted in the error when it fails


# --------------------------------------------------------------------------- MLflow


def mlflow_epoch_logger(run_id: str) -> Callable[[dict[str, float]], None]:
    """An epoch callback that logs the finite metrics to MLflow run ``run_id`` at step ``epoch``.

    Uses ``MlflowClient`` with the tracking URI of the environment
    (``MLFLOW_TRACKING_URI``), which :func:`launch_training` passes to the workers.
    """
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
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={distributed.nnodes}",
        f"--nproc_per_node={distributed.nproc_per_node}",
    ]
    if distributed.rdzv_endpoint is None:
        command.append("--standalone")
    else:
        command += [
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={distributed.rdzv_endpoint}",
            f"--rdzv_id={distributed.rdzv_id}",
        ]
    return [*command, "-m", "emonet.training.launcher", *worker_args]


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
    train_csv, val_csv, img_dir : as for :func:`emonet.training.trainer.train_from_csvs`.
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
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    config_path = checkpoint_dir / CONFIG_FILENAME
    with atomic_open(config_path) as handle:
        yaml.safe_dump(config_to_dict(config), handle, sort_keys=False)
    worker_args = [
        "--config",
        str(config_path),
        "--train-csv",
        str(train_csv),
        "--val-csv",
        str(val_csv),
        "--img-dir",
        str(img_dir),
        "--checkpoint-dir",
        str(checkpoint_dir),
        "--no-progress",
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
        tc.distributed.nnodes,
        tc.distributed.nproc_per_node,
        tc.batch_size,
        tc.batch_size * tc.distributed.world_size,
        " ".join(command),
    )
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
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
    parser = argparse.ArgumentParser(
        prog="python -m emonet.training.launcher", description="one torchrun training worker"
    )
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
        args.train_csv,
        args.val_csv,
        args.img_dir,
        config,
        args.checkpoint_dir,
        callbacks=callbacks,
        resume_from=args.resume_from,
        affect_bounds=bounds,
        progress=args.progress,
    )
    if worker_rank == 0:
        logger.info("best val mAP %.4f at epoch %d: %s", result.best_metric, result.best_epoch, result.best_checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
