"""REST throughput of the served EmoNet model (`make serve`) against in-process ``pyfunc.predict``.

Self-contained: writes a temporary demo archive, trains ResNet-18 for one epoch, logs and
registers the pyfunc (with its ONNX export) in a temporary SQLite store, then for each
runtime (torch, ONNX Runtime) and worker count starts the real scoring server with
``make serve MODEL=... WORKERS=N RUNTIME=...`` on loopback and sends a
bounded load: a fixed number of requests of single images and of 32-row batches (base64
PNG crops), from 4 and 16 client threads. It prints requests/s, images/s, p50/p99
latency and the server's memory (all its processes) before and after, and the ratio of
served images/s at batch 32 to in-process ``pyfunc.predict`` of the same 32 rows,
measured in the same run with the same runtime. Goals: ratio >= 0.8 with one worker;
with ONNX Runtime, a lower single-image p50 than with torch (same run, same load).

The clients share the machine's cores with the server: on 2 cores, a second worker
competes with the clients and with the first worker, so it need not be faster.

    .venv/bin/python benchmarks/bench_rest.py [--workers 1 2] [--runtimes torch onnxruntime] [--requests 200]
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import requests
from mlflow import MlflowClient
from PIL import Image

from emonet.config import load_config
from emonet.data.annotations import load_annotations
from emonet.data.arrays import load_array
from emonet.data.demo import make_demo_data
from emonet.models.network import build_model
from emonet.schema import annotations_path, arrays_dir
from emonet.tracking.run_logging import configure_mlflow, log_emonet_model
from emonet.training.run_loaders import make_loaders
from emonet.training.trainer import fit

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.8
BATCH = 32


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 1e6


def _train_and_register(tmp: Path, n_images: int) -> tuple[str, list[str]]:
    """A one-epoch ResNet-18 registered as ``emonet@champion`` in a SQLite store under
    ``tmp``; returns the store's URI and the test crops as base64 PNG."""
    root = make_demo_data(tmp / "demo", seed=0, n_train=32, n_val=16, n_test=n_images, size=112)
    config = load_config(
        model={"backbone": "resnet18", "dropout": 0.0},
        train={"image_size": 112, "epochs": 1, "batch_size": 16, "num_workers": 0, "device": "cpu", "augment": False},
    )
    train_loader, val_loader = make_loaders(
        annotations_path(root, "train"), annotations_path(root, "val"), arrays_dir(root), config
    )
    result = fit(
        build_model(config.model), train_loader, val_loader, config, checkpoint_dir=tmp / "ckpt", progress=False
    )
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    experiment_id = configure_mlflow(uri, "bench-rest", tmp / "artifacts")
    client = MlflowClient()
    run_id = client.create_run(experiment_id).info.run_id
    version = log_emonet_model(run_id, result.best_checkpoint, None, batch_size=BATCH, device="cpu")
    client.set_registered_model_alias("emonet", "champion", version.version)
    client.set_terminated(run_id)
    test = load_annotations(annotations_path(root, "test"))
    return uri, [_png_b64(load_array(arrays_dir(root), name)) for name in test["Crop_name"]]


def _in_process_images_per_second(uri: str, frame: pd.DataFrame, repeats: int, runtime: str) -> float:
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model("models:/emonet@champion", model_config={"inference_runtime": runtime})
    model.predict(frame)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict(frame)
        times.append(time.perf_counter() - start)
    return len(frame) / statistics.median(times)


def _model_sizes_mb(uri: str) -> dict[str, float]:
    """The champion's artifact files and their sizes, in MB."""
    mlflow.set_tracking_uri(uri)
    folder = Path(mlflow.artifacts.download_artifacts("models:/emonet@champion")) / "artifacts"
    return {path.name: path.stat().st_size / 1e6 for path in sorted(folder.iterdir()) if path.is_file()}


def _start_server(uri: str, port: int, workers: int, runtime: str, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [
                "make",
                "-o",
                ".venv/.installed-stamp",
                "serve",
                "MODEL=models:/emonet@champion",
                f"PORT={port}",
                f"WORKERS={workers}",
                f"RUNTIME={runtime}",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"make serve exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not up after 300 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)  # make's own session: make, mlflow, uvicorn workers
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)


def _load(port: int, payloads: list[dict], clients: int) -> tuple[float, list[float]]:
    """Send every payload once from ``clients`` threads; wall seconds and per-request latencies."""
    url = f"http://127.0.0.1:{port}/invocations"
    sessions: dict[int, requests.Session] = {}

    def send(payload: dict) -> float:
        import threading

        session = sessions.setdefault(threading.get_ident(), requests.Session())
        start = time.perf_counter()
        response = session.post(url, json=payload, timeout=120)
        latency = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
        return latency

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = list(pool.map(send, payloads))
    return time.perf_counter() - start, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="scoring worker counts to try")
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16], help="client thread counts")
    parser.add_argument("--requests", type=int, default=200, help="single-image requests per load")
    parser.add_argument("--batch-requests", type=int, default=40, help=f"{BATCH}-row requests per load")
    parser.add_argument("--repeats", type=int, default=5, help="in-process predict calls timed (median)")
    parser.add_argument(
        "--runtimes", nargs="+", default=["torch", "onnxruntime"], choices=["torch", "onnxruntime"], help="to compare"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")

    with tempfile.TemporaryDirectory(prefix="bench_rest_") as tmp:
        tmp = Path(tmp)
        uri, images = _train_and_register(tmp, n_images=BATCH)
        sizes = ", ".join(f"{name} {size:.1f} MB" for name, size in _model_sizes_mb(uri).items())
        print(f"served model's artifacts: {sizes}")
        batch_frame = pd.DataFrame({"image_b64": images[:BATCH]})
        single = [{"dataframe_records": [{"image_b64": images[i % len(images)]}]} for i in range(args.requests)]
        batched = [
            {"dataframe_split": {"columns": ["image_b64"], "data": [[image] for image in images[:BATCH]]}}
        ] * args.batch_requests
        single_p50: dict[tuple[str, int, int], float] = {}

        for runtime in args.runtimes:
            in_process = _in_process_images_per_second(uri, batch_frame, args.repeats, runtime)
            print(
                f"\n[{runtime}] in-process pyfunc.predict, {BATCH}-row frame: {in_process:7.1f} img/s "
                f"(median of {args.repeats})"
            )
            for workers in args.workers:
                port = _free_port()
                server = _start_server(uri, port, workers, runtime, tmp / f"serve_{runtime}_{workers}.log")
                try:
                    _load(port, single[:8] + batched[:2], clients=2)  # warm-up: every worker loads its model
                    memory_before = _tree_rss_mb(server.pid)
                    print(f"[{runtime}] workers: {workers}; server memory {memory_before:.0f} MB after warm-up")
                    for rows, payloads in ((1, single), (BATCH, batched)):
                        for clients in args.clients:
                            seconds, latencies = _load(port, payloads, clients)
                            ordered = sorted(latencies)
                            p50 = 1000 * statistics.median(ordered)
                            p99 = 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
                            images_per_second = len(payloads) * rows / seconds
                            line = (
                                f"  {rows:2d} row(s) x {len(payloads):4d} requests, {clients:2d} clients: "
                                f"{len(payloads) / seconds:7.1f} req/s, {images_per_second:7.1f} img/s, "
                                f"p50 {p50:7.1f} ms, p99 {p99:7.1f} ms"
                            )
                            if rows == 1:
                                single_p50[runtime, workers, clients] = p50
                            if rows == BATCH:
                                ratio = images_per_second / in_process
                                verdict = "OK" if ratio >= TARGET_RATIO or workers > 1 else "BELOW TARGET"
                                line += (
                                    f", ratio to in-process {ratio:.2f} ({verdict} for >= {TARGET_RATIO} with 1 worker)"
                                )
                            print(line)
                    print(
                        f"  server memory {memory_before:.0f} MB before the loads, "
                        f"{_tree_rss_mb(server.pid):.0f} MB after"
                    )
                finally:
                    _stop_server(server)

        if {"torch", "onnxruntime"} <= set(args.runtimes):
            print("\nsingle-image p50, onnxruntime / torch (same run):")
            for workers in args.workers:
                for clients in args.clients:
                    ratio = single_p50["onnxruntime", workers, clients] / single_p50["torch", workers, clients]
                    verdict = "OK" if ratio < 1 else "NOT LOWER"
                    print(f"  {workers} worker(s), {clients:2d} clients: {ratio:.2f} ({verdict}: goal < 1)")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end (2 cores: above ~0.5 at start, figures are skewed)")


if __name__ == "__main__":
    main()
