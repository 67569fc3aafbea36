"""Throughput of the logged MLflow pyfunc against the bare torch model on the same crops.

Self-contained: writes a temporary demo archive, trains ResNet-18 for one epoch at
112 px, logs and registers the pyfunc in a temporary SQLite store, loads it back with
``mlflow.pyfunc.load_model`` and times ``predict`` on an ``image_path`` table of the
test crops (.npy). The baseline is the bare ``model(body)`` forward on the SAME crops,
already preprocessed, with the same batch size, in the same process. Warm-up passes
are excluded; both paths run in turn in every round, and the ratio compares the best
round of each (the least disturbed by other load; the per-round spread is printed
too). Target: ratio >= 0.8.

    .venv/bin/python benchmarks/bench_pyfunc.py [--n-images 128] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow import MlflowClient

from emonet.config import load_config
from emonet.data.annotations import load_annotations
from emonet.data.demo import make_demo_data
from emonet.data.images import read_image
from emonet.inference.predictor import Predictor
from emonet.models.network import build_model
from emonet.schema import annotations_path, arrays_dir
from emonet.tracking.registry import promote_model
from emonet.tracking.run_logging import configure_mlflow, log_emonet_model
from emonet.training.run_loaders import make_loaders
from emonet.training.trainer import fit

TARGET_RATIO = 0.8


def interleaved_times(fns: list, repeats: int) -> list[list[float]]:
    """Wall times of each function over ``repeats`` rounds, calling them in turn.

    Alternating the paths exposes them to the same background load within a round, so
    the per-round ratio is a fair comparison even when the machine's load drifts.
    """
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=128, help="crops per timed predict call")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (both paths)")
    parser.add_argument("--image-size", type=int, default=112, help="network input side")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs both paths)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench_pyfunc_") as tmp:
        tmp = Path(tmp)
        root = make_demo_data(tmp / "demo", seed=0, n_train=32, n_val=16, n_test=args.n_images, size=112)
        config = load_config(
            model={"backbone": "resnet18", "variant": "body", "dropout": 0.0},
            train={
                "image_size": args.image_size,
                "epochs": 1,
                "batch_size": 16,
                "num_workers": 0,
                "device": "cpu",
                "augment": False,
            },
        )
        train_loader, val_loader = make_loaders(
            annotations_path(root, "train"), annotations_path(root, "val"), arrays_dir(root), config
        )
        result = fit(
            build_model(config.model), train_loader, val_loader, config, checkpoint_dir=tmp / "ckpt", progress=False
        )

        db = tmp / "mlflow.db"
        experiment_id = configure_mlflow(f"sqlite:///{db}", "bench", tmp / "artifacts")
        client = MlflowClient()
        run_id = client.create_run(experiment_id).info.run_id
        version = log_emonet_model(run_id, result.best_checkpoint, None, batch_size=args.batch_size, device="cpu")
        promote_model(client, "emonet", version.version, 0.0, "bench", run_id)
        client.set_terminated(run_id)
        pyfunc = mlflow.pyfunc.load_model("models:/emonet@champion")

        test = load_annotations(annotations_path(root, "test"))
        paths = [str(arrays_dir(root) / name) for name in test["Crop_name"]]
        table = pd.DataFrame({"image_path": paths})

        # Baseline: the same crops, decoded and preprocessed once outside the timing.
        predictor = Predictor.from_checkpoint(result.best_checkpoint, device="cpu", batch_size=args.batch_size)
        inputs = predictor.inputs(lambda row: (read_image(paths[row]), None), len(paths))
        body = torch.stack([inputs[row]["body"] for row in range(len(paths))])  # (N, 3, S, S)
        model = predictor.model

        def bare() -> None:
            with torch.inference_mode():
                for start in range(0, len(body), args.batch_size):
                    model(body[start : start + args.batch_size])

        def served() -> None:
            out = pyfunc.predict(table)
            assert len(out) == len(paths)

        def decode_preprocess() -> None:
            # The work pyfunc.predict adds to the forward pass (besides MLflow's own).
            for row in range(len(paths)):
                inputs[row]

        bare()  # warm-up (allocator, oneDNN kernels)
        served()
        decode_preprocess()
        times = interleaved_times([bare, served, decode_preprocess], args.repeats)

    n = len(paths)
    t_bare, t_pyfunc, t_prep = (min(t) for t in times)  # best round: the least disturbed
    ratio = t_bare / t_pyfunc  # (pyfunc img/s) / (bare img/s), best rounds
    per_round = sorted(b / p for b, p in zip(times[0], times[1]))
    print(
        f"images: {n}, batch size: {args.batch_size}, input: {args.image_size} px, "
        f"torch threads: {torch.get_num_threads()}, rounds: {args.repeats}"
    )
    print(f"bare torch forward (preprocessed): {n / t_bare:8.1f} img/s (best round)")
    print(f"pyfunc.predict (image_path .npy):  {n / t_pyfunc:8.1f} img/s (best round)")
    print(
        f"decode + preprocess alone:         {n / t_prep:8.1f} img/s "
        f"({1000 * t_prep / n:.2f} ms/img, {100 * t_prep / (t_prep + t_bare):.1f}% of decode + forward)"
    )
    print(
        f"per-round ratios (spread from background load): "
        f"min {per_round[0]:.3f}, median {statistics.median(per_round):.3f}, max {per_round[-1]:.3f}"
    )
    verdict = "OK" if ratio >= TARGET_RATIO else "BELOW TARGET"
    print(f"ratio pyfunc / bare (best rounds): {ratio:.3f} (target >= {TARGET_RATIO}) -> {verdict}")


if __name__ == "__main__":
    main()
