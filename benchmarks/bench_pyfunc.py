"""Throughput of the logged MLflow pyfunc, on torch and on ONNX Runtime, against the bare
torch model on the same crops.

Self-contained: writes a temporary demo archive, trains a network for one epoch (ResNet-18
at 112 px by default), logs and registers the pyfunc with its ONNX export in a temporary
SQLite store, loads it back with ``mlflow.pyfunc.load_model`` once per runtime and times
``predict`` on an ``image_path`` table of the test crops (.npy). The baselines are the
bare forward passes on the SAME crops, already preprocessed, with the same batch size, in
the same process: torch's ``model(body)`` and ONNX Runtime's ``session.run`` on the
exported file. Warm-up passes are excluded; every path runs in turn in every round.

Ratios and targets:

- pyfunc (torch) / bare torch, best rounds: >= 0.8 (what the pyfunc adds: decoding,
  preprocessing, MLflow);
- bare ONNX Runtime / bare torch, medians: >= 2 for a ResNet-50 at 224 px
  (``--backbone resnet50 --image-size 224``, the seed's recipe);
- pyfunc (onnxruntime) / pyfunc (torch), medians: >= 1.15 for the demo ResNet-18 at
  64 px (``--image-size 64``).

    .venv/bin/python benchmarks/bench_pyfunc.py [--backbone resnet18] [--image-size 112] [--n-images 128]
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
from emonet.inference.onnx_runtime import onnx_session
from emonet.inference.predictor import Predictor
from emonet.models.network import build_model
from emonet.schema import annotations_path, arrays_dir
from emonet.tracking.registry import promote_model
from emonet.tracking.run_logging import configure_mlflow, log_emonet_model
from emonet.training.run_loaders import make_loaders
from emonet.training.trainer import fit

TARGET_RATIO = 0.8
ONNX_BARE_TARGET = 2.0  # ResNet-50 at 224 px
ONNX_PYFUNC_TARGET = 1.15  # the demo ResNet-18 at 64 px


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
    parser.add_argument("--backbone", default="resnet18", help="torchvision backbone (resnet50: the seed's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs both paths)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench_pyfunc_") as tmp:
        tmp = Path(tmp)
        root = make_demo_data(tmp / "demo", seed=0, n_train=32, n_val=16, n_test=args.n_images, size=112)
        config = load_config(
            model={"backbone": args.backbone, "variant": "body", "dropout": 0.0},
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
        version = log_emonet_model(
            run_id,
            result.best_checkpoint,
            None,
            batch_size=args.batch_size,
            device="cpu",
            check_csv=annotations_path(root, "val"),
            img_dir=arrays_dir(root),
        )
        print(f"ONNX export: {client.get_model_version('emonet', version.version).tags['onnx_export']}")
        promote_model(client, "emonet", version.version, 0.0, "bench", run_id)
        client.set_terminated(run_id)
        pyfuncs = {
            runtime: mlflow.pyfunc.load_model("models:/emonet@champion", model_config={"inference_runtime": runtime})
            for runtime in ("torch", "onnxruntime")
        }
        onnx_path = Path(mlflow.artifacts.download_artifacts("models:/emonet@champion")) / "artifacts" / "emonet.onnx"
        session = onnx_session(onnx_path)

        test = load_annotations(annotations_path(root, "test"))
        paths = [str(arrays_dir(root) / name) for name in test["Crop_name"]]
        table = pd.DataFrame({"image_path": paths})

        # Baseline: the same crops, decoded and preprocessed once outside the timing.
        predictor = Predictor.from_checkpoint(result.best_checkpoint, device="cpu", batch_size=args.batch_size)
        inputs = predictor.inputs(lambda row: (read_image(paths[row]), None), len(paths))
        body = torch.stack([inputs[row]["body"] for row in range(len(paths))])  # (N, 3, S, S)
        body_array = body.numpy()
        model = predictor.model

        def bare() -> None:
            with torch.inference_mode():
                for start in range(0, len(body), args.batch_size):
                    model(body[start : start + args.batch_size])

        def bare_onnx() -> None:
            for start in range(0, len(body_array), args.batch_size):
                session.run(["emotion_logits", "affect"], {"body": body_array[start : start + args.batch_size]})

        def served(runtime: str):
            def predict() -> None:
                out = pyfuncs[runtime].predict(table)
                assert len(out) == len(paths)

            return predict

        def decode_preprocess() -> None:
            # The work pyfunc.predict adds to the forward pass (besides MLflow's own).
            for row in range(len(paths)):
                inputs[row]

        paths_timed = [bare, bare_onnx, served("torch"), served("onnxruntime"), decode_preprocess]
        for fn in paths_timed:
            fn()  # warm-up (allocator, oneDNN kernels, ONNX Runtime's arena)
        times = interleaved_times(paths_timed, args.repeats)

    n = len(paths)
    t_bare, t_onnx, t_pyfunc, t_pyfunc_onnx, t_prep = (min(t) for t in times)  # best round: the least disturbed
    m_bare, m_onnx, m_pyfunc, m_pyfunc_onnx, _ = (statistics.median(t) for t in times)
    ratio = t_bare / t_pyfunc  # (pyfunc img/s) / (bare img/s), best rounds
    per_round = sorted(b / p for b, p in zip(times[0], times[2]))
    print(
        f"backbone: {args.backbone}, images: {n}, batch size: {args.batch_size}, input: {args.image_size} px, "
        f"torch threads: {torch.get_num_threads()}, rounds: {args.repeats}"
    )
    print(f"bare torch forward (preprocessed):       {n / t_bare:8.1f} img/s best, {n / m_bare:8.1f} median")
    print(f"bare ONNX Runtime forward (preprocessed): {n / t_onnx:8.1f} img/s best, {n / m_onnx:8.1f} median")
    print(f"pyfunc.predict, torch (image_path .npy):  {n / t_pyfunc:8.1f} img/s best, {n / m_pyfunc:8.1f} median")
    print(
        f"pyfunc.predict, onnxruntime:              {n / t_pyfunc_onnx:8.1f} img/s best, "
        f"{n / m_pyfunc_onnx:8.1f} median"
    )
    print(
        f"decode + preprocess alone:                {n / t_prep:8.1f} img/s "
        f"({1000 * t_prep / n:.2f} ms/img, {100 * t_prep / (t_prep + t_bare):.1f}% of decode + forward)"
    )
    print(
        f"per-round ratios pyfunc (torch) / bare (spread from background load): "
        f"min {per_round[0]:.3f}, median {statistics.median(per_round):.3f}, max {per_round[-1]:.3f}"
    )
    verdict = "OK" if ratio >= TARGET_RATIO else "BELOW TARGET"
    print(
        f"ratio pyfunc (torch) / bare torch (best rounds): {ratio:.3f} "
        f"(target >= {TARGET_RATIO} at 112 px) -> {verdict}"
    )
    bare_ratio, pyfunc_ratio = m_bare / m_onnx, m_pyfunc / m_pyfunc_onnx
    print(
        f"ratio bare ONNX Runtime / bare torch (medians): {bare_ratio:.3f} "
        f"(target >= {ONNX_BARE_TARGET} for resnet50 at 224 px)"
    )
    print(
        f"ratio pyfunc onnxruntime / pyfunc torch (medians): {pyfunc_ratio:.3f} "
        f"(target >= {ONNX_PYFUNC_TARGET} for the demo resnet18 at 64 px)"
    )


if __name__ == "__main__":
    main()
