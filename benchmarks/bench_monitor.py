"""Monitoring a batch against scoring the same crops with the bare pyfunc model, in the same run.

Self-contained: writes a temporary demo archive, trains a network for one epoch (the demo
ResNet-18 at 64 px by default), registers it with its ONNX export in a temporary SQLite
store and stores its monitoring reference (100 validation crops). Then, on a batch of
``--n-crops`` demo crops (PNG files listed by ``image_path``), it times in turn, round
after round:

- the baseline: ``mlflow.pyfunc.load_model(...).predict`` on the batch's table, in requests
  of 250 rows (the pyfunc takes at most 256; ONNX Runtime, as ``auto`` picks on the CPU);
- monitoring's work: reading the batch, its input signals and face visibility (MediaPipe's
  face landmarker on every crop, as for a batch without a ``Face_Visibility`` column), the
  same network with its features, the 61 tests and the performance check (the batch is
  labelled).

Goal: monitoring <= 1.25x the scoring time (medians). Printed apart: the share of each
step, the ratio without face visibility (a batch that carries its ``Face_Visibility``
column), and one whole ``monitor_batch`` with Evidently's HTML report and the MLflow run.

    .venv/bin/python benchmarks/bench_monitor.py [--n-crops 1000] [--backbone resnet18] [--image-size 64]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow import MlflowClient

from emonet.config import load_config
from emonet.data.demo import make_demo_data
from emonet.models.network import build_model
from emonet.monitoring.batches import open_batch
from emonet.monitoring.demo import write_demo_batches
from emonet.monitoring.drift import check_performance, detect_drift
from emonet.monitoring.monitor import load_monitoring_predictor, monitor_batch
from emonet.monitoring.reference import ensure_reference
from emonet.monitoring.scoring import score_batch
from emonet.schema import FACE_VISIBILITY_COLUMN, annotations_path, arrays_dir
from emonet.tracking.registry import promote_model
from emonet.tracking.run_logging import configure_mlflow, log_emonet_model
from emonet.training.run_loaders import make_loaders
from emonet.training.trainer import fit

TARGET = 1.25
MAX_ROWS = 250


def _train(tmp: Path, root: Path, backbone: str, image_size: int) -> Path:
    config = load_config(
        model={"backbone": backbone, "variant": "body", "dropout": 0.0},
        train={"image_size": image_size, "epochs": 1, "batch_size": 16, "num_workers": 0, "device": "cpu"},
    )
    loaders = make_loaders(annotations_path(root, "train"), annotations_path(root, "val"), arrays_dir(root), config)
    return fit(build_model(config.model), *loaders, config, checkpoint_dir=tmp / "ckpt", progress=False).best_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-crops", type=int, default=1000, help="crops in the monitored batch")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64, help="network input side (the demo's 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs both paths)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"load average at the start: {os.getloadavg()[0]:.2f}; torch threads: {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory(prefix="bench_monitor_") as tmp:
        tmp = Path(tmp)
        root = make_demo_data(tmp / "demo", seed=0, n_train=64, n_val=100, n_test=1)
        checkpoint = _train(tmp, root, args.backbone, args.image_size)
        experiment_id = configure_mlflow(f"sqlite:///{tmp / 'mlflow.db'}", "bench", tmp / "artifacts")
        client = MlflowClient()
        run_id = client.create_run(experiment_id).info.run_id
        val_csv, img_dir = annotations_path(root, "val"), arrays_dir(root)
        version = log_emonet_model(run_id, checkpoint, None, device="cpu", check_csv=val_csv, img_dir=img_dir)
        promote_model(client, "emonet", version.version, 0.0, "bench", run_id)
        client.set_terminated(run_id)
        predictor = load_monitoring_predictor(version)
        reference = ensure_reference(client, version, predictor, split_csv=val_csv, img_dir=img_dir)
        batch_csv = write_demo_batches(tmp / "batches", rows=args.n_crops)["like"]
        table = pd.read_csv(batch_csv)
        frame = pd.DataFrame({"image_path": [str(batch_csv.parent / p) for p in table["image_path"]]})
        pyfunc = mlflow.pyfunc.load_model("models:/emonet@champion")
        # The pyfunc refuses more than inference_max_rows (256) rows per request: a caller
        # scoring 1,000 crops sends them in requests of at most that many.
        chunks = [frame.iloc[i : i + MAX_ROWS] for i in range(0, len(frame), MAX_ROWS)]

        def scoring_work() -> None:
            for chunk in chunks:
                pyfunc.predict(chunk)

        print(f"runtime: {predictor.runtime}; batch: {len(frame)} crops; reference: {len(reference)} crops")

        steps: dict[str, list[float]] = {"faces": [], "network": [], "statistics": []}

        def monitoring_work(batch_path: Path) -> None:
            batch = open_batch(batch_path)
            scored = score_batch(predictor, batch)
            started = time.perf_counter()
            detect_drift(reference.table, scored.table, reference.features, scored.features)
            check_performance(reference.labels, reference.emotion_prob, scored.labels, scored.emotion_prob)
            steps["statistics"].append(time.perf_counter() - started)
            steps["faces"].append(scored.seconds["inputs"])
            steps["network"].append(scored.seconds["network"])

        scored = score_batch(predictor, open_batch(batch_csv))  # warm-up; its scores make the second CSV
        with_faces = batch_csv.with_name("with_faces.csv")
        table.assign(**{FACE_VISIBILITY_COLUMN: scored.table["face_visibility"].to_numpy()}).to_csv(with_faces)
        scoring_work()
        paths = [scoring_work, lambda: monitoring_work(batch_csv), lambda: monitoring_work(with_faces)]
        times: list[list[float]] = [[] for _ in paths]
        for _ in range(args.repeats):
            for i, path in enumerate(paths):
                started = time.perf_counter()
                path()
                times[i].append(time.perf_counter() - started)
        scoring, monitoring, without_faces = (statistics.median(t) for t in times)

        started = time.perf_counter()
        whole = monitor_batch(batch_csv, "models:/emonet@champion", report=True)
        whole_seconds = time.perf_counter() - started

    n = len(frame)

    def step(name: str, case: int) -> float:  # case 0: faces scored by MediaPipe, 1: given
        return statistics.median(steps[name][case::2])

    print(f"pyfunc.predict (scoring):            {scoring:7.2f} s ({n / scoring:6.1f} crops/s)")
    for label, seconds, case in (
        ("monitoring's work:", monitoring, 0),
        ("with Face_Visibility given:", without_faces, 1),
    ):
        print(f"{label:<37}{seconds:7.2f} s")
        reading = "reading, signals, faces:" if case == 0 else "reading, signals:"
        print(f"  of which {reading:<27}{step('faces', case):7.2f} s")
        print(f"  of which the network + features:   {step('network', case):7.2f} s")
        print(f"  of which the 61 tests, performance: {step('statistics', case):6.2f} s")
    print(
        f"whole monitor_batch with the HTML report and the MLflow run: {whole_seconds:.2f} s "
        f"(report {whole.seconds.get('report', float('nan')):.2f} s)"
    )
    ratio = monitoring / scoring
    verdict = "OK" if ratio <= TARGET else "ABOVE TARGET"
    print(f"ratio monitoring / scoring (medians): {ratio:.3f} (target <= {TARGET}) -> {verdict}")
    print(f"ratio with Face_Visibility in the batch: {without_faces / scoring:.3f}")


if __name__ == "__main__":
    main()
