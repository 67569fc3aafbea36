"""MLflow store and logging: store defaults and checks, logging the pyfunc from code, and
loading it in a fresh process, on a temporary SQLite store."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import restored_mlflow_uris, run_together
from mlflow import MlflowClient
from PIL import Image

from emonet.inference.predictor import OUTPUT_COLUMNS, PROB_COLUMNS
from emonet.models.checkpoint import SERVING_CHECKPOINT, SERVING_KEYS, read_checkpoint
from emonet.tracking.registry import CHAMPION, promote_model
from emonet.tracking.run_logging import configure_mlflow, pip_requirements
from emonet.utils.store import default_artifact_location, default_tracking_uri

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "emonet"


def _png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


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


def test_configure_mlflow_refuses_a_file_that_is_not_an_mlflow_store(tmp_path):
    """A 0-byte or foreign file used to be silently turned into a new, empty store."""
    with restored_mlflow_uris():
        configure_mlflow(f"sqlite:///{tmp_path / 'good' / 'mlflow.db'}", "exp")  # missing: created
        assert (tmp_path / "good" / "mlflow.db").stat().st_size > 0

        empty = tmp_path / "empty.db"
        empty.touch()
        with pytest.raises(ValueError, match=f"{empty}.*empty"):
            configure_mlflow(f"sqlite:///{empty}", "exp")
        assert empty.stat().st_size == 0, "the empty file must not be turned into a store"

        text = tmp_path / "notes.db"
        text.write_text("not a database at all")
        with pytest.raises(ValueError, match=f"{text}.*not a SQLite database"):
            configure_mlflow(f"sqlite:///{text}", "exp")

        foreign = tmp_path / "foreign.db"
        with contextlib.closing(sqlite3.connect(foreign)) as connection:
            connection.execute("CREATE TABLE notes (text TEXT)")
        with pytest.raises(ValueError, match=f"{foreign}.*not an MLflow store"):
            configure_mlflow(f"sqlite:///{foreign}", "exp")

        malformed = tmp_path / "malformed.db"
        malformed.write_bytes((tmp_path / "good" / "mlflow.db").read_bytes())
        with open(malformed, "r+b") as file:  # keep the header, overwrite the schema pages
            file.seek(100)
            file.write(b"\xff" * 20000)
        with pytest.raises(ValueError, match=f"{malformed}.*malformed"):
            configure_mlflow(f"sqlite:///{malformed}", "exp")


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    """MLflow's table creation fails ("duplicate column") when two processes run it at once."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = f"""
from emonet.tracking.run_logging import configure_mlflow
barrier("open")
print(configure_mlflow({uri!r}, "exp"))
"""
    results = run_together(script, 2, tmp_path)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    assert len({r.stdout.strip().splitlines()[-1] for r in results}) == 1  # one experiment


def test_pip_requirements_cover_what_the_served_model_imports():
    """Every third-party distribution that the emonet modules loaded by the served model
    import at module level is pinned, at its installed version; training-only ones are not."""
    import ast
    import json
    import subprocess
    import sys
    from importlib.metadata import packages_distributions, version

    script = "import json, sys, emonet.inference.pyfunc_model; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
        .stdout.strip()
        .splitlines()[-1]
    )
    imported: set[str] = set()
    for name in (m for m in loaded if m == "emonet" or m.startswith("emonet.")):
        source = Path(sys.modules[name].__file__ if name in sys.modules else __import__(name, fromlist=["_"]).__file__)
        for node in ast.parse(source.read_text()).body:
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    distributions = packages_distributions()
    pinned = dict(r.split("==") for r in pip_requirements())
    # A module may come from several distributions (mlflow, mlflow-skinny): one pinned is enough.
    unpinned = [
        module
        for module in sorted(imported - set(sys.stdlib_module_names) - {"emonet", "__future__"})
        if not {d.lower() for d in distributions.get(module, [])} & set(pinned)
    ]
    assert not unpinned, f"imported but not pinned: {unpinned}"
    assert "scikit-learn" not in pinned, "serving needs no training code"
    assert pinned["torch"] == version("torch").split("+")[0]


# --------------------------------------------------------------------------- logging


def test_log_emonet_model_from_another_thread(logged_model, mlflow_store):
    client, run_id, version = logged_model["client"], logged_model["run_id"], logged_model["version"]
    assert version.name == MODEL_NAME and version.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # the caller's run is not ended by logging into it
    # MLflow copies model_config into params; the prefix keeps the training batch size intact.
    assert run.data.params["batch_size"] == "16"
    assert run.data.params["inference_batch_size"] == "32"
    model_id = version.source.removeprefix("models:/")
    assert [output.model_id for output in run.outputs.model_outputs] == [model_id]
    entity = client.get_logged_model(model_id)
    assert entity.experiment_id == mlflow_store["experiment_id"] and entity.source_run_id == run_id
    assert version.tags["variant"] == "body" and version.tags["backbone"] == "resnet18"

    model_dir = Path(mlflow.artifacts.download_artifacts(version.source))
    assert (model_dir / "code" / "emonet" / "inference" / "predictor.py").is_file()
    served = read_checkpoint(model_dir / "artifacts" / SERVING_CHECKPOINT)
    assert served["serving"] is True and set(served) <= {*SERVING_KEYS, "serving"}, "the serving part only"
    assert (model_dir / "artifacts" / "normalization.json").is_file()
    assert sorted((model_dir / "requirements.txt").read_text().split()) == sorted(pip_requirements())
    info = mlflow.models.get_model_info(version.source)
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["image_path", "image_b64"]
    assert info.signature.outputs.input_names() == list(OUTPUT_COLUMNS)
    example = json.loads((model_dir / "input_example.json").read_text())
    assert example["columns"] == ["image_b64"]  # portable: no machine-specific path


def test_champion_loads_in_a_fresh_process_without_the_repository(logged_model, mlflow_store, tmp_path):
    """The registered model must load where this repository is not importable.

    The child runs with ``-I`` (no PYTHONPATH, no user site, no script folder on
    sys.path) from ``tmp_path``, and first removes the editable install's finder and
    path hook, then checks that ``emonet`` is not importable at all. So ``emonet`` can
    only come from the model's own ``code_paths`` copy, which the child checks too.
    """
    client, version, run_id = logged_model["client"], logged_model["version"].version, logged_model["run_id"]
    assert promote_model(client, MODEL_NAME, version, 0.25, "split-a", run_id).alias == CHAMPION

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
        mlflow.set_tracking_uri({mlflow_store["uri"]!r})
        mlflow.set_registry_uri({mlflow_store["uri"]!r})
        # Every load-time setting the docs name reaches the model (MLflow drops keys it was not logged with).
        overrides = {{"inference_batch_size": 2, "inference_max_pixels": 10**6, "inference_max_rows": 5,
                     "inference_max_request_pixels": 10**7}}
        model = mlflow.pyfunc.load_model("models:/{MODEL_NAME}@champion", model_config=overrides)
        served = model.unwrap_python_model()
        assert served.predictor.batch_size == 2
        assert (served.max_pixels, served.max_rows, served.max_request_pixels) == (10**6, 5, 10**7)
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
