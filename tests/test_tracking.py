"""MLflow layer: store defaults, logging the pyfunc from code, loading it in a fresh process,
serving it over REST (slow), and champion/challenger promotion, on a temporary SQLite store."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from emonet.inference import OUTPUT_COLUMNS, PROB_COLUMNS
from emonet.tracking import (
    CHALLENGER,
    CHAMPION,
    configure_mlflow,
    default_artifact_location,
    default_tracking_uri,
    log_emonet_model,
    pip_requirements,
    promote_model,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "emonet"


def _png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@contextlib.contextmanager
def restored_mlflow_uris():
    """Undo configure_mlflow's global state: MLflow's URIs and the env vars it sets with them."""
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A temporary SQLite tracking + registry store for the module."""
    base = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    with restored_mlflow_uris():
        experiment_id = configure_mlflow(uri, "emonet-test", base / "artifacts")
        yield {"uri": uri, "experiment_id": experiment_id, "base": base}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint["checkpoint"]


@pytest.fixture(scope="module")
def logged(store, checkpoint):
    """One pyfunc logged and registered from a worker thread, to a run left RUNNING."""
    client = MlflowClient()
    run_id = client.create_run(store["experiment_id"]).info.run_id
    client.log_param(run_id, "batch_size", 16)  # the training batch size, as the flow logs it
    # Another thread than the one that created the run: nothing may rely on an active run.
    with ThreadPoolExecutor(max_workers=1) as pool:
        version = pool.submit(log_emonet_model, run_id, checkpoint, None, None, MODEL_NAME).result()
    return {"run_id": run_id, "version": version, "client": client}


# --------------------------------------------------------------------------- store defaults


def test_default_tracking_uri_and_artifact_location(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = default_tracking_uri(tmp_path / "repo")
    assert uri == f"sqlite:///{(tmp_path / 'repo' / 'mlruns' / 'mlflow.db').resolve()}"
    assert uri.startswith("sqlite:////") and (tmp_path / "repo" / "mlruns").is_dir()
    artifacts = (tmp_path / "repo" / "mlruns" / "artifacts").resolve()
    assert default_artifact_location(tmp_path / "repo") == artifacts.as_uri()
    assert default_tracking_uri() == f"sqlite:///{REPO_ROOT / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_configure_mlflow_creates_the_experiment_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"  # the db folder does not exist yet
    with restored_mlflow_uris():
        first = configure_mlflow(uri, "exp-a")
        assert mlflow.get_tracking_uri() == uri and mlflow.get_registry_uri() == uri
        experiment = MlflowClient().get_experiment(first)
        # Artifacts beside the database by default, as an absolute file URI.
        assert experiment.artifact_location == (tmp_path / "db" / "artifacts").as_uri()
        assert configure_mlflow(uri, "exp-a") == first
        other = configure_mlflow(uri, "exp-b", artifact_location=tmp_path / "elsewhere")
        assert MlflowClient().get_experiment(other).artifact_location == (tmp_path / "elsewhere").as_uri()
        MlflowClient().delete_experiment(other)
        with pytest.raises(ValueError, match="'exp-b' .* is deleted"):
            configure_mlflow(uri, "exp-b")


def test_pip_requirements_pin_installed_versions():
    from importlib.metadata import version

    requirements = pip_requirements()
    assert f"torch=={version('torch').split('+')[0]}" in requirements
    assert {r.split("==")[0] for r in requirements} >= {
        "torch", "torchvision", "numpy", "pandas", "pillow", "mlflow", "pydantic", "pyyaml", "scikit-learn", "tqdm"
    }


# --------------------------------------------------------------------------- logging


def test_log_emonet_model_from_another_thread(logged, store):
    client, run_id, version = logged["client"], logged["run_id"], logged["version"]
    assert version.name == MODEL_NAME and version.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # the caller's run is not ended by logging into it
    # MLflow copies model_config into params; the prefix keeps the training batch size intact.
    assert run.data.params["batch_size"] == "16"
    assert run.data.params["inference_batch_size"] == "32"
    model_id = version.source.removeprefix("models:/")
    assert [output.model_id for output in run.outputs.model_outputs] == [model_id]
    logged_model = client.get_logged_model(model_id)
    assert logged_model.experiment_id == store["experiment_id"] and logged_model.source_run_id == run_id
    assert version.tags["variant"] == "body" and version.tags["backbone"] == "resnet18"

    model_dir = Path(mlflow.artifacts.download_artifacts(version.source))
    assert (model_dir / "code" / "emonet" / "inference.py").is_file()
    assert (model_dir / "artifacts" / "best.pt").is_file()
    assert (model_dir / "artifacts" / "normalization.json").is_file()
    assert sorted((model_dir / "requirements.txt").read_text().split()) == sorted(pip_requirements())
    info = mlflow.models.get_model_info(version.source)
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["image_path", "image_b64"]
    assert info.signature.outputs.input_names() == list(OUTPUT_COLUMNS)
    example = json.loads((model_dir / "input_example.json").read_text())
    assert example["columns"] == ["image_b64"]  # portable: no machine-specific path


def test_champion_loads_in_a_fresh_process_without_the_repository(logged, store, tmp_path):
    """The registered model must load where this repository is not importable.

    The child runs with ``-I`` (no PYTHONPATH, no user site, no script folder on
    sys.path) from ``tmp_path``, and first removes the editable install's finder and
    path hook, then checks that ``emonet`` is not importable at all. So ``emonet`` can
    only come from the model's own ``code_paths`` copy, which the child checks too.
    """
    result = promote_model(logged["client"], MODEL_NAME, logged["version"].version, 0.25, "split-a", logged["run_id"])
    assert result["alias"] == CHAMPION

    image = np.random.default_rng(0).integers(0, 256, size=(45, 30, 3), dtype=np.uint8)
    np.save(tmp_path / "crop.npy", image)
    Image.fromarray(image).save(tmp_path / "crop.png")
    script = textwrap.dedent(
        f"""
        import importlib, json, sys
        sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f)]
        sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
        sys.path[:] = [p for p in sys.path if "__editable__" not in p]
        sys.path_importer_cache.clear()
        importlib.invalidate_caches()
        assert importlib.util.find_spec("emonet") is None, "emonet is importable before loading the model"

        import mlflow, pandas as pd
        mlflow.set_tracking_uri({store["uri"]!r})
        mlflow.set_registry_uri({store["uri"]!r})
        model = mlflow.pyfunc.load_model("models:/{MODEL_NAME}@champion", model_config={{"inference_batch_size": 2}})
        assert model.unwrap_python_model().predictor.batch_size == 2
        table = pd.DataFrame({{
            "image_path": ["crop.npy", "crop.png", None],
            "image_b64": [None, None, {_png_b64(image)!r}],
        }})
        out = model.predict(table)
        print(json.dumps({{"emonet": sys.modules["emonet"].__file__, "frame": out.to_dict(orient="split")}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"}}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not Path(payload["emonet"]).is_relative_to(REPO_ROOT)
    assert Path(payload["emonet"]).parent.parent.name == "code"  # <model>/code/emonet/__init__.py
    assert payload["frame"]["columns"] == list(OUTPUT_COLUMNS)
    rows = [dict(zip(payload["frame"]["columns"], row)) for row in payload["frame"]["data"]]
    assert len(rows) == 3
    for row in rows:
        assert all(0.0 <= row[c] <= 1.0 for c in PROB_COLUMNS)
        assert -1.0 <= row["valence"] <= 1.0 and 1.0 <= row["valence_1_10"] <= 10.0
        assert math.isclose(row["valence_1_10"], (row["valence"] + 1) / 2 * 9 + 1, rel_tol=1e-6)
    # The same pixels through .npy, .png and base64 give the same prediction.
    for row in rows[1:]:
        assert all(math.isclose(row[c], rows[0][c], abs_tol=1e-5) for c in PROB_COLUMNS)


# --------------------------------------------------------------------------- promotion


@pytest.fixture
def registry(logged, request):
    """A fresh registered model per test, whose versions reuse the logged model's source."""
    client = logged["client"]
    name = f"promo-{request.node.name}"[:100]
    client.create_registered_model(name)
    source, experiment_id = logged["version"].source, client.get_run(logged["run_id"]).info.experiment_id

    def new_version() -> tuple[str, str]:
        run_id = client.create_run(experiment_id).info.run_id
        return str(client.create_model_version(name, source, run_id=run_id).version), run_id

    return client, name, new_version


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}


def test_first_version_becomes_champion(registry):
    client, name, new_version = registry
    version, run_id = new_version()
    result = promote_model(client, name, version, 0.31, "split-a", run_id)
    assert result == {
        "alias": CHAMPION, "decision": "first_version", "reason": result["reason"],
        "new_map": 0.31, "previous_map": None, "previous_version": None,
    }
    assert _aliases(client, name) == {CHAMPION: version}
    tags = client.get_model_version(name, version).tags
    assert float(tags["test_mAP"]) == 0.31 and tags["test_split"] == "split-a"
    run = client.get_run(run_id)
    assert run.data.tags["promotion_decision"] == "first_version"
    assert run.data.metrics["candidate_test_mAP"] == 0.31
    assert "champion_previous_test_mAP" not in run.data.metrics


def test_worse_then_better_version(registry):
    client, name, new_version = registry
    v1, r1 = new_version()
    promote_model(client, name, v1, 0.30, "split-a", r1)

    v2, r2 = new_version()
    worse = promote_model(client, name, v2, 0.28, "split-a", r2)
    assert (worse["alias"], worse["decision"], worse["previous_map"], worse["previous_version"]) == (
        CHALLENGER, "not_better", 0.30, v1)
    assert _aliases(client, name) == {CHAMPION: v1, CHALLENGER: v2}
    run = client.get_run(r2)
    assert run.data.metrics["champion_previous_test_mAP"] == 0.30 and run.data.metrics["candidate_test_mAP"] == 0.28
    assert run.data.tags["promotion_decision"] == "not_better" and run.data.tags["champion_previous_version"] == v1

    v3, r3 = new_version()
    tie = promote_model(client, name, v3, 0.30, "split-a", r3)
    assert tie["alias"] == CHALLENGER and _aliases(client, name)[CHAMPION] == v1  # a tie does not win

    v4, r4 = new_version()
    better = promote_model(client, name, v4, 0.35, "split-a", r4)
    assert (better["alias"], better["decision"], better["previous_map"]) == (CHAMPION, "promoted", 0.30)
    assert _aliases(client, name)[CHAMPION] == v4
    assert client.get_run(r4).data.tags["promotion_alias"] == CHAMPION

    again = promote_model(client, name, int(v4), 0.35, "split-a", r4)  # re-run of the same step
    assert (again["alias"], again["decision"]) == (CHAMPION, "already_champion")
    assert _aliases(client, name) == {CHAMPION: v4, CHALLENGER: v3}


def test_different_test_split_never_moves_the_champion(registry):
    client, name, new_version = registry
    v1, r1 = new_version()
    promote_model(client, name, v1, 0.30, "sha256:aaa", r1)
    v2, r2 = new_version()
    result = promote_model(client, name, v2, 0.90, "sha256:bbb", r2)  # far higher, other split
    assert (result["alias"], result["decision"]) == (CHALLENGER, "different_test_split")
    assert "sha256:aaa" in result["reason"] and "sha256:bbb" in result["reason"]
    assert _aliases(client, name) == {CHAMPION: v1, CHALLENGER: v2}
    assert client.get_run(r2).data.tags["promotion_decision"] == "different_test_split"


def test_champion_score_falls_back_to_its_run_metric(registry):
    client, name, new_version = registry
    v1, r1 = new_version()
    promote_model(client, name, v1, 0.30, "split-a", r1)
    client.delete_model_version_tag(name, v1, "test_mAP")  # e.g. a champion registered by hand
    client.log_metric(r1, "test_mAP", 0.40)
    v2, r2 = new_version()
    result = promote_model(client, name, v2, 0.35, "split-a", r2)
    assert (result["alias"], result["previous_map"]) == (CHALLENGER, 0.40)


def test_promote_model_validates_inputs(registry, tmp_path):
    client, name, new_version = registry
    version, run_id = new_version()
    with pytest.raises(ValueError, match="finite"):
        promote_model(client, name, version, float("nan"), "split-a", run_id)
    with pytest.raises(ValueError, match="test_split_id"):
        promote_model(client, name, version, 0.3, "", run_id)
