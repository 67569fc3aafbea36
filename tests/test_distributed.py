"""Distributed data-parallel training on the CPU: gloo on loopback, 2 processes, tiny data.

The processes are real: ``torch.multiprocessing.spawn`` for the checks that compare a
2-process step with a 1-process one, and ``torchrun`` (through the launcher and the
Prefect task) for the job as users run it.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from emonet.config import DistributedConfig, EmoNetConfig, load_config
from emonet.data.dataset import EmoticDataset
from emonet.data.demo import make_demo_data
from emonet.data.normalize import AffectNormalizer
from emonet.inference.loop import predict_split
from emonet.inference.predictor import Predictor
from emonet.models.network import build_model
from emonet.schema import NUM_EMOTIONS, annotations_path, arrays_dir
from emonet.training.ddp import gather_predictions, resolve_backend
from emonet.training.launcher import launch_training, torchrun_command
from emonet.training.losses import EmoNetLoss
from emonet.training.run_loaders import make_loaders
from emonet.training.seeding import seed_everything
from emonet.training.trainer import evaluate, fit, train_from_csvs

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")

N_VAL = 7  # odd: the two validation shards differ in size


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _splits(root: Path) -> tuple[Path, Path, Path]:
    return annotations_path(root, "train"), annotations_path(root, "val"), arrays_dir(root)


def _step_config(batch_size: int) -> EmoNetConfig:
    """One optimizer step over 16 samples, with nothing random in it: no augmentation, no dropout."""
    return load_config(
        model={"backbone": "resnet18", "dropout": 0.0},
        train={
            "image_size": 32,
            "batch_size": batch_size,
            "epochs": 1,
            "lr": 1e-3,
            "num_workers": 0,
            "device": "cpu",
            "seed": 3,
            "augment": False,
        },
    )


def _resume_config(epochs: int) -> EmoNetConfig:
    """Augmentation and dropout on, so a resume must restore every rank's RNG states."""
    return load_config(
        model={"backbone": "resnet18"},
        train={
            "image_size": 32,
            "batch_size": 4,
            "epochs": epochs,
            "lr": 1e-3,
            "num_workers": 0,
            "device": "cpu",
            "seed": 5,
        },
    )


def _freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d with its statistics.

    With batch statistics, 2 processes x 8 samples and 1 process x 16 samples are not
    the same computation; with fixed statistics they are.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)
    return module


def _step_model(config: EmoNetConfig) -> nn.Module:
    seed_everything(config.train.seed)
    return _freeze_batchnorm(build_model(config.model))


def _worker(rank: int, world: int, port: int, root: Path, out: Path) -> None:
    """One of the 2 spawned processes: a one-step fit, the gathered validation, a
    distributed resume and the SyncBatchNorm error; results go to ``out/rank{rank}.json``."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    train_csv, val_csv, img_dir = _splits(root)
    results: dict[str, Any] = {}
    try:
        config = _step_config(batch_size=8)
        model = _step_model(config)
        train_loader, val_loader = make_loaders(train_csv, val_csv, img_dir, config)
        result = fit(model, train_loader, val_loader, config, checkpoint_dir=out / "step", progress=False)
        results["val_mAP"] = result.history[0]["val_mAP"]
        results["val_rows_here"] = len(val_loader.sampler)
        results["gathered_indices"] = gather_predictions(predict_split(model, val_loader)).indices.tolist()

        results["straight"] = train_from_csvs(
            train_csv, val_csv, img_dir, _resume_config(2), out / "straight", progress=False
        ).history
        train_from_csvs(train_csv, val_csv, img_dir, _resume_config(1), out / "resumed", progress=False)
        results["resumed"] = train_from_csvs(
            train_csv,
            val_csv,
            img_dir,
            _resume_config(2),
            out / "resumed",
            resume_from=out / "resumed" / "last.pt",
            progress=False,
        ).history

        sync = load_config(
            model={"backbone": "resnet18"},
            train={"image_size": 32, "device": "cpu", "distributed": {"sync_batchnorm": True}},
        )
        try:
            fit(build_model(sync.model), train_loader, val_loader, sync, progress=False)
        except ValueError as error:
            results["sync_batchnorm_error"] = str(error)
    finally:
        dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = make_demo_data(tmp_path_factory.mktemp("demo"), seed=2, n_train=16, n_val=N_VAL, n_test=1, size=32)
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), root, out), nprocs=2, join=True)
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
    return {"root": root, "out": out, "ranks": ranks}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
def test_one_step_on_two_processes_equals_one_process_on_the_whole_batch(
    spawned: dict[str, Any], tmp_path: Path
) -> None:
    config = _step_config(batch_size=16)
    model = _step_model(config)
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    train_loader, val_loader = make_loaders(*_splits(spawned["root"]), config)
    fit(model, train_loader, val_loader, config, checkpoint_dir=tmp_path, progress=False)
    single, ddp = _weights(tmp_path / "best.pt"), _weights(spawned["out"] / "step" / "best.pt")
    assert single.keys() == ddp.keys()
    moved = [name for name in single if not torch.equal(single[name], initial[name])]
    assert "emotion_head.weight" in moved and len(moved) > 10
    # AdamW's first step is about lr (1e-3) x the sign of each gradient; float rounding of
    # the gradient average may move a near-zero gradient's step by a small fraction of it.
    for name, tensor in single.items():
        torch.testing.assert_close(ddp[name], tensor, rtol=1e-4, atol=5e-5, msg=name)


@pytest.mark.slow
def test_validation_is_gathered_from_all_ranks_once(spawned: dict[str, Any]) -> None:
    first, second = spawned["ranks"]
    assert (first["val_rows_here"], second["val_rows_here"]) == (4, 3)
    assert first["gathered_indices"] == second["gathered_indices"] == list(range(N_VAL))
    assert first["val_mAP"] == second["val_mAP"]
    # The same weights in one process, on the whole split.
    config = _step_config(batch_size=8)
    model = _step_model(config)
    model.load_state_dict(_weights(spawned["out"] / "step" / "best.pt"))
    _, val_loader = make_loaders(*_splits(spawned["root"]), config)
    single = evaluate(model, val_loader, EmoNetLoss.from_config(config.loss), torch.device("cpu"))
    assert first["val_mAP"] == pytest.approx(single["val_mAP"], abs=1e-9)


@pytest.mark.slow
def test_a_distributed_run_resumes_to_the_same_weights(spawned: dict[str, Any]) -> None:
    first, second = spawned["ranks"]
    assert [row["epoch"] for row in first["resumed"]] == [1, 2]
    for resumed_row, straight_row in zip(first["resumed"], first["straight"], strict=True):
        assert resumed_row == pytest.approx(straight_row, rel=0, abs=1e-6)
    assert first["straight"] == second["straight"]  # every rank saw the same gathered metrics
    straight, resumed = (
        _weights(spawned["out"] / "straight" / "last.pt"),
        _weights(spawned["out"] / "resumed" / "last.pt"),
    )
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)
    checkpoint = torch.load(spawned["out"] / "straight" / "last.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng_ranks"]) == 2


@pytest.mark.slow
def test_sync_batchnorm_on_the_cpu_is_a_config_error(spawned: dict[str, Any]) -> None:
    message = spawned["ranks"][0]["sync_batchnorm_error"]
    assert "train.distributed.sync_batchnorm needs CUDA" in message and "cpu" in message


# --------------------------------------------------------------------------- torchrun


@pytest.mark.slow
# The task runs outside a flow; Prefect's own closing lines say so. The task's log is kept.
@pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted to send logs:UserWarning")
def test_prefect_task_trains_with_torchrun_and_the_checkpoint_serves(
    prefect_env: dict[str, Any], tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
    from prefect.logging.handlers import APILogHandler

    from tasks.training import train_model

    root = make_demo_data(tmp_path / "demo", seed=4, n_train=16, n_val=N_VAL, n_test=1, size=32)
    train_csv, val_csv, img_dir = _splits(root)
    normalization_json = AffectNormalizer().save(tmp_path / "normalization.json")
    client = MlflowClient(tracking_uri=prefect_env["tracking_uri"])
    run_id = client.create_run(client.create_experiment(f"ddp-{tmp_path.name}")).info.run_id

    config = load_config(
        model={"backbone": "resnet18"},
        train={
            "image_size": 32,
            "batch_size": 4,
            "epochs": 1,
            "num_workers": 0,
            "device": "cpu",
            "distributed": {"nproc_per_node": 2},
        },
    )
    state = train_model(
        run_id=run_id,
        config=config,
        train_csv=train_csv,
        val_csv=val_csv,
        img_dir=img_dir,
        checkpoint_dir=tmp_path / "checkpoints",
        normalization_json=normalization_json,
        return_state=True,
    )
    assert state.is_completed(), state.message
    result = state.result()
    assert result.best_epoch == 1 and result.best_checkpoint == tmp_path / "checkpoints" / "best.pt"

    # Rank 0 logged the epoch to the MLflow run; the task logged the effective batch.
    assert [metric.step for metric in client.get_metric_history(run_id, "val_mAP")] == [1]
    assert client.get_run(run_id).data.params["effective_batch_size"] == "8"

    # The job's output reached the task's log.
    APILogHandler().flush()
    with get_client(sync_client=True) as prefect:
        logs = prefect.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[state.state_details.task_run_id])))
    messages = "\n".join(log.message for log in logs)
    assert "rank 0 INFO emonet.training.trainer: epoch 1/1" in messages

    # The distributed checkpoint serves in a single process.
    predictor = Predictor.from_checkpoint(result.best_checkpoint, normalizer=normalization_json)
    predictions = predictor.predict(EmoticDataset(val_csv, img_dir, transform=predictor.transform))
    assert predictions.emotion_prob.shape == (N_VAL, NUM_EMOTIONS)
    assert np.isfinite(predictions.emotion_prob).all()


@pytest.mark.slow
def test_a_failed_rank_fails_the_launch_with_the_tail_of_its_log(tmp_path: Path) -> None:
    root = make_demo_data(tmp_path / "demo", seed=4, n_train=8, n_val=4, n_test=1, size=32)
    train_csv, _, img_dir = _splits(root)
    config = load_config(
        model={"backbone": "resnet18"},
        train={
            "image_size": 32,
            "batch_size": 4,
            "epochs": 1,
            "num_workers": 0,
            "device": "cpu",
            "distributed": {"nproc_per_node": 2},
        },
    )
    lines: list[str] = []
    with pytest.raises(RuntimeError, match=r"(?s)torchrun exited with code 1.*missing_val\.csv"):
        launch_training(
            config, train_csv, tmp_path / "missing_val.csv", img_dir, tmp_path / "run", on_line=lines.append
        )
    assert any("missing_val.csv" in line for line in lines)


# --------------------------------------------------------------------------- config and command


def test_distributed_config_and_torchrun_command() -> None:
    assert not DistributedConfig().enabled
    assert DistributedConfig(nproc_per_node=2).world_size == 2
    with pytest.raises(ValueError, match="nnodes=2 needs rdzv_endpoint"):
        DistributedConfig(nnodes=2)
    with pytest.raises(ValueError, match="backend"):
        load_config(train={"distributed": {"backend": "mpi"}})

    one_box = torchrun_command(DistributedConfig(nproc_per_node=4), ["--config", "c.yaml"])
    assert one_box[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in one_box and "--nproc_per_node=4" in one_box
    assert one_box[-4:] == ["-m", "emonet.training.launcher", "--config", "c.yaml"]
    cluster = torchrun_command(DistributedConfig(nproc_per_node=8, nnodes=2, rdzv_endpoint="10.0.0.1:29400"), [])
    assert {"--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=10.0.0.1:29400", "--rdzv_id=emonet"} <= set(cluster)
    assert "--standalone" not in cluster


def test_backend_resolution() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu) == "gloo" and resolve_backend("auto", cuda) == "nccl"
    assert resolve_backend("gloo", cuda) == "gloo"
    with pytest.raises(ValueError, match="'nccl' needs CUDA"):
        resolve_backend("nccl", cpu)
