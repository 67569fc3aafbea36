"""REST serving exactly as the README says: ``make serve MODEL=... PORT=...`` with the
tracking store in ``MLFLOW_TRACKING_URI``, from a shell whose PATH lacks the venv: a good
row is scored, a bad row is refused with HTTP 400 naming it."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from conftest import restored_mlflow_uris
from mlflow import MlflowClient
from PIL import Image

from emonet.schema import EMOTIONS
from emonet.tracking.run_logging import log_emonet_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "emonet-rest"


def _png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def champion_store(tmp_path_factory, tiny_checkpoint) -> str:
    """A SQLite store whose model ``emonet-rest`` has a champion version."""
    base = tmp_path_factory.mktemp("rest-store")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment_id = client.create_experiment("rest", artifact_location=(base / "artifacts").as_uri())
    run_id = client.create_run(experiment_id).info.run_id
    # log_emonet_model logs through MLflow's global URIs.
    with restored_mlflow_uris():
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        version = log_emonet_model(run_id, tiny_checkpoint["checkpoint"], None, None, MODEL_NAME)
    client.set_registered_model_alias(MODEL_NAME, "champion", version.version)
    return uri


def test_make_serve_answers_an_image_b64_row(champion_store, tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "MLFLOW_REGISTRY_URI"}}
    # A new user's shell: no venv activated, so no uvicorn on PATH.
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not (Path(p) / "uvicorn").exists()
    )
    env["MLFLOW_TRACKING_URI"] = champion_store
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        # -o: the venv running this test is never reinstalled from here.
        server = subprocess.Popen(
            [
                "make",
                "-o",
                ".venv/.installed-stamp",
                "serve",
                f"MODEL=models:/{MODEL_NAME}@champion",
                f"PORT={port}",
                "WORKERS=2",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, f"make serve exited with {server.returncode}:\n{log_path.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"server not up after 240 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)

        image = np.random.default_rng(1).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
        response = requests.post(
            f"{url}/invocations", json={"dataframe_records": [{"image_b64": _png_b64(image)}]}, timeout=60
        )
        assert response.status_code == 200, response.text
        [row] = response.json()["predictions"]
        assert all(0.0 <= row[f"prob_{emotion}"] <= 1.0 for emotion in EMOTIONS)
        assert -1.0 <= row["valence"] <= 1.0 and 1.0 <= row["valence_1_10"] <= 10.0

        bad = {"dataframe_split": {"columns": ["image_b64"], "data": [[_png_b64(image)], ["not-an-image"]]}}
        response = requests.post(f"{url}/invocations", json=bad, timeout=60)
        assert response.status_code == 400 and "row 1" in response.text, response.text

        # Bounded requests: too many rows, or too many pixels in all (each image under its own limit).
        tiny = _png_b64(image[:8, :8])
        response = requests.post(
            f"{url}/invocations", json={"dataframe_records": [{"image_b64": tiny}] * 257}, timeout=60
        )
        assert response.status_code == 400 and "inference_max_rows" in response.text, response.text
        large = _png_b64(np.zeros((6300, 6300, 3), dtype=np.uint8))  # 39.7 Mpx, a few KB as PNG
        response = requests.post(
            f"{url}/invocations", json={"dataframe_records": [{"image_b64": large}] * 6}, timeout=60
        )
        assert response.status_code == 400 and "inference_max_request_pixels" in response.text, response.text
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # make's own session: make, mlflow and uvicorn
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def test_make_serve_gives_each_worker_its_share_of_the_cores():
    # nproc reports OMP_NUM_THREADS where it is set: the make runs without it, as from a terminal.
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}

    def dry_run(*args: str) -> subprocess.CompletedProcess:
        command = ["make", "-n", "-o", ".venv/.installed-stamp", "serve", *args]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)

    cores = len(os.sched_getaffinity(0))
    for workers in (1, 2, 64):
        command = dry_run(f"WORKERS={workers}").stdout
        assert f"--workers {workers}" in command
        assert f"OMP_NUM_THREADS={max(1, cores // workers)} " in command
    refused = subprocess.run(
        ["make", "-o", ".venv/.installed-stamp", "serve", "WORKERS=0"], cwd=REPO, capture_output=True, text=True
    )
    assert refused.returncode != 0 and "WORKERS must be a positive integer, got '0'" in refused.stderr

    # RUNTIME picks what runs the network; unset, the model's own setting (auto) stays.
    assert "MLFLOW_PYFUNC_INFERENCE_CONFIG" not in dry_run().stdout
    assert """MLFLOW_PYFUNC_INFERENCE_CONFIG='{"inference_runtime": "torch"}'""" in dry_run("RUNTIME=torch").stdout
    refused = subprocess.run(
        ["make", "-o", ".venv/.installed-stamp", "serve", "RUNTIME=tensorrt"], cwd=REPO, capture_output=True, text=True
    )
    every = "auto, onnxruntime, onnxruntime-int8 or torch"
    assert refused.returncode != 0 and f"RUNTIME must be {every}, got 'tensorrt'" in refused.stderr
