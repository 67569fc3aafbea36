"""MLflow layer: store defaults, logging the pyfunc from code, loading it in a fresh process,
serving it over REST (slow), and champion/challenger promotion, on a temporary SQLite store."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from conftest import restored_mlflow_uris
from emonet.evaluation import split_fingerprint
from emonet.inference import OUTPUT_COLUMNS, PROB_COLUMNS
from emonet.schema import annotations_path, arrays_dir
from emonet.tracking import (
    CHALLENGER,
    CHAMPION,
    END_REASON_TAG,
    FLOW_RUN_TAG,
    HOST_TAG,
    PID_TAG,
    PROCESS_START_TAG,
    close_stale_runs,
    configure_mlflow,
    default_artifact_location,
    default_tracking_uri,
    find_run_version,
    log_emonet_model,
    pip_requirements,
    process_tags,
    promote_model,
    score_model_on_split,
    split_score_tag,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "emonet"


def _png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


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
from emonet.tracking import configure_mlflow
barrier("open")
print(configure_mlflow({uri!r}, "exp"))
"""
    results = _run_together(script, 2, tmp_path)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    assert len({r.stdout.strip().splitlines()[-1] for r in results}) == 1  # one experiment


# Defines `me` (this child's index), `n` and `barrier(name)`: every child waits there
# until all have arrived, so their next steps really overlap.
CHILD_PROLOGUE = """
import sys, time
from pathlib import Path
me, n = int(sys.argv[1]), int(sys.argv[2])

def barrier(name):
    Path(f"{name}-{me}.arrived").touch()
    deadline = time.monotonic() + 240
    while len(list(Path().glob(f"{name}-*.arrived"))) < n:
        assert time.monotonic() < deadline, f"barrier {name}: the other processes never arrived"
        time.sleep(0.01)
"""


def _run_together(script: str, n: int, cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run ``script`` (after :data:`CHILD_PROLOGUE`) in ``n`` processes at once, in ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD_PROLOGUE + script, str(i), str(n)],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(n)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=400)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


def test_pip_requirements_cover_what_the_served_model_imports():
    """Every third-party distribution that the emonet modules loaded by the served model
    import at module level is pinned, at its installed version; training-only ones are not."""
    import ast
    import json
    import subprocess
    import sys
    from importlib.metadata import packages_distributions, version

    script = "import json, sys, emonet.pyfunc_model; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                       check=True, timeout=300).stdout.strip().splitlines()[-1])
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
    unpinned = [module for module in sorted(imported - set(sys.stdlib_module_names) - {"emonet", "__future__"})
                if not {d.lower() for d in distributions.get(module, [])} & set(pinned)]
    assert not unpinned, f"imported but not pinned: {unpinned}"
    assert "scikit-learn" not in pinned, "serving needs no training code"
    assert pinned["torch"] == version("torch").split("+")[0]


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


@pytest.fixture(scope="module")
def split(tiny_checkpoint):
    """A real labelled test split (the tiny archive's) and its fingerprint."""
    root = tiny_checkpoint["root"]
    test_csv = annotations_path(root, "test")
    return {"csv": test_csv, "img_dir": arrays_dir(root), "id": split_fingerprint(pd.read_csv(test_csv))}


def test_score_model_on_split_matches_the_evaluation(logged, checkpoint, split, tmp_path):
    from emonet.evaluation import evaluate_checkpoint

    score = score_model_on_split(logged["version"].source, split["csv"], split["img_dir"])
    report = evaluate_checkpoint(checkpoint, split["csv"], split["img_dir"], tmp_path, device="cpu", progress=False)
    assert score == pytest.approx(report.metrics["mAP"], abs=1e-6)


def test_champion_of_another_split_is_rescored_on_the_candidates(registry, split, monkeypatch):
    """A new test split no longer freezes the champion: it is re-scored on the candidate's split."""
    import emonet.tracking

    client, name, new_version = registry
    rescored = []

    def counting_score(*args):
        rescored.append(args)
        return score_model_on_split(*args)

    monkeypatch.setattr(emonet.tracking, "score_model_on_split", counting_score)
    v1, r1 = new_version()
    promote_model(client, name, v1, 0.99, "sha256:aaa", r1)  # a high score, but on another split
    truth = score_model_on_split(f"models:/{name}/{v1}", split["csv"], split["img_dir"])

    v2, r2 = new_version()
    better = promote_model(
        client, name, v2, truth + 0.01, split["id"], r2, test_csv=split["csv"], img_dir=split["img_dir"]
    )
    assert [args[0] for args in rescored] == [f"models:/{name}/{v1}"]
    assert (better["alias"], better["decision"], better["previous_version"]) == (CHAMPION, "promoted", v1)
    assert better["previous_map"] == pytest.approx(truth)
    assert _aliases(client, name) == {CHAMPION: v2}
    run = client.get_run(r2)
    assert run.data.metrics["champion_previous_test_mAP"] == pytest.approx(truth)
    assert run.data.tags["champion_previous_version"] == v1 and run.data.tags["promotion_decision"] == "promoted"
    # The old champion keeps its score on the new split as a tag, so it is never re-scored twice.
    old = client.get_model_version(name, v1).tags
    assert float(old[split_score_tag(split["id"])]) == pytest.approx(truth) and old["test_split"] == "sha256:aaa"

    v3, r3 = new_version()
    worse = promote_model(
        client, name, v3, truth, split["id"], r3, test_csv=split["csv"], img_dir=split["img_dir"]
    )
    assert (worse["alias"], worse["decision"], worse["previous_map"]) == (CHALLENGER, "not_better", truth + 0.01)
    assert len(rescored) == 1, "the champion was scored on this split: its own score is used"


def test_rescoring_needs_the_split(registry):
    client, name, new_version = registry
    v1, r1 = new_version()
    promote_model(client, name, v1, 0.30, "sha256:aaa", r1)
    v2, r2 = new_version()
    with pytest.raises(ValueError, match="never scored on test split sha256:bbb: pass test_csv"):
        promote_model(client, name, v2, 0.40, "sha256:bbb", r2)
    assert _aliases(client, name) == {CHAMPION: v1}


def test_a_champion_that_cannot_be_loaded_is_replaced(registry, logged, split, tmp_path):
    client, name, new_version = registry
    copy = tmp_path / "model"
    shutil.copytree(mlflow.artifacts.download_artifacts(logged["version"].source), copy)
    run_id = client.create_run(client.get_run(logged["run_id"]).info.experiment_id).info.run_id
    v1 = str(client.create_model_version(name, copy.as_uri(), run_id=run_id).version)
    promote_model(client, name, v1, 0.30, "sha256:aaa", run_id)
    shutil.rmtree(copy)  # its artifacts are gone

    v2, r2 = new_version()
    result = promote_model(client, name, v2, 0.10, split["id"], r2, test_csv=split["csv"], img_dir=split["img_dir"])
    assert (result["alias"], result["decision"], result["previous_version"]) == (CHAMPION, "champion_unavailable", v1)
    assert f"champion version {v1} cannot be scored" in result["reason"] and result["previous_map"] is None
    assert _aliases(client, name) == {CHAMPION: v2}
    tags = client.get_run(r2).data.tags
    assert tags["promotion_decision"] == "champion_unavailable" and tags["promotion_reason"] == result["reason"]


def test_min_improvement(registry):
    client, name, new_version = registry
    v1, r1 = new_version()
    promote_model(client, name, v1, 0.30, "split-a", r1, min_improvement=0.05)
    v2, r2 = new_version()
    small = promote_model(client, name, v2, 0.34, "split-a", r2, min_improvement=0.05)
    assert (small["alias"], small["decision"]) == (CHALLENGER, "not_better")
    assert "min_improvement 0.05" in small["reason"]
    v3, r3 = new_version()
    large = promote_model(client, name, v3, 0.36, "split-a", r3, min_improvement=0.05)
    assert (large["alias"], large["decision"]) == (CHAMPION, "promoted")
    with pytest.raises(ValueError, match="min_improvement"):
        promote_model(client, name, v3, 0.36, "split-a", r3, min_improvement=-0.01)


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


# --------------------------------------------------------------------------- concurrency and retries


def test_concurrent_registrations_leave_the_better_version_champion(tmp_path):
    """Two processes register and promote into one SQLite store at the same moment.

    The worse version's alias move is delayed the most, so without the lock around
    decide-and-alias it would move last and win. Checked with the file lock of SQLite
    stores and with the registry lock used for other stores.
    """
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with restored_mlflow_uris():
        experiment_id = configure_mlflow(uri, "exp")
        client = MlflowClient()
        for name in ("file-locked", "registry-locked"):
            client.create_registered_model(name)
            run_id = client.create_run(experiment_id).info.run_id
            version = client.create_model_version(name, "file:///nowhere/model", run_id=run_id).version
            promote_model(client, name, version, 0.30, "split-a", run_id)
    script = f"""
import json
import emonet.tracking
from mlflow import MlflowClient
from emonet.tracking import configure_mlflow, promote_model

scores, delays = [0.60, 0.50], [0.2, 2.0]  # child 0 is better; child 1 moves its alias last

class SlowAliasClient(MlflowClient):
    def set_registered_model_alias(self, name, alias, version):
        time.sleep(delays[me])
        super().set_registered_model_alias(name, alias, version)

experiment_id = configure_mlflow({uri!r}, "exp")
client = SlowAliasClient()
results = {{}}
for name in ("file-locked", "registry-locked"):
    if name == "registry-locked":
        emonet.tracking._promotion_lock = emonet.tracking._registry_lock
    run_id = client.create_run(experiment_id).info.run_id
    barrier(name + "-register")
    version = client.create_model_version(name, "file:///nowhere/model", run_id=run_id).version
    barrier(name + "-promote")
    results[name] = promote_model(client, name, version, scores[me], "split-a", run_id)
    results[name]["version"] = str(version)
print(json.dumps(results))
"""
    runs = _run_together(script, 2, tmp_path)
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-3000:] for r in runs]
    better, worse = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    with restored_mlflow_uris():
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        for name in ("file-locked", "registry-locked"):
            assert _aliases(client, name)[CHAMPION] == better[name]["version"], (better[name], worse[name])
            # Whoever decided second saw the first one's result.
            assert {better[name]["decision"], worse[name]["decision"]} in ({"promoted"}, {"promoted", "not_better"})
            assert not client.search_registered_models(f"name = '{name}.promotion-lock'")  # released


def test_registry_lock_waits_for_its_holder_and_breaks_a_stale_one(logged):
    from emonet.tracking import _registry_lock

    client, name = logged["client"], "locked-model"
    client.create_registered_model(f"{name}.promotion-lock", tags={"owner": "elsewhere:1", "acquired": repr(time.time())})
    with pytest.raises(TimeoutError, match="held by elsewhere:1"), _registry_lock(client, name, timeout=0.5):
        pass
    client.set_registered_model_tag(f"{name}.promotion-lock", "acquired", repr(time.time() - 2 * 3600))
    with _registry_lock(client, name, timeout=5):  # left by a killed holder: broken
        assert client.get_registered_model(f"{name}.promotion-lock").tags["owner"] != "elsewhere:1"
    assert not client.search_registered_models(f"name = '{name}.promotion-lock'")


def test_a_retried_registration_reuses_the_runs_version(logged, checkpoint, split, monkeypatch):
    """The register-model task looks up the run's version before logging a new one."""
    import logging

    import tasks.model

    client = logged["client"]
    name = "retried-registration"
    run_id = client.create_run(client.get_run(logged["run_id"]).info.experiment_id).info.run_id
    calls = []

    def counting_log(*args, **kwargs):
        calls.append(args)
        return log_emonet_model(*args, **kwargs)

    monkeypatch.setattr(tasks.model, "log_emonet_model", counting_log)
    monkeypatch.setattr(tasks.model, "get_run_logger", lambda: logging.getLogger("test"))
    arguments = (run_id, checkpoint, None, {"mAP": 0.3}, split["id"], name, split["csv"], split["img_dir"])
    first = tasks.model.register_model.fn(*arguments)
    again = tasks.model.register_model.fn(*arguments)  # as a task retry after a later failure
    assert len(calls) == 1
    assert first["version"] == again["version"] == "1"
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    assert (first["decision"], again["decision"]) == ("first_version", "already_champion")
    assert str(find_run_version(client, name, run_id).version) == "1"
    assert find_run_version(client, name, logged["run_id"]) is None


# --------------------------------------------------------------------------- runs left RUNNING


def _dead_process_tags() -> dict[str, str]:
    """process_tags() of a process that has ended, as a SIGKILLed flow leaves them."""
    import psutil

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    started = psutil.Process(child.pid).create_time()
    child.kill()
    child.wait(timeout=30)
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(child.pid), PROCESS_START_TAG: repr(started)}


def test_close_stale_runs_ends_runs_of_killed_flows_only(store):
    client = MlflowClient()
    experiment_id = configure_mlflow(store["uri"], "stale-runs")

    def running(tags: dict[str, str]) -> str:
        return client.create_run(experiment_id, tags=tags).info.run_id

    killed = running({FLOW_RUN_TAG: "flow-killed", **_dead_process_tags()})
    crashed = running({FLOW_RUN_TAG: "flow-crashed", HOST_TAG: "elsewhere", PID_TAG: "1"})
    failed = running({FLOW_RUN_TAG: "flow-failed"})
    alive = running({FLOW_RUN_TAG: "flow-alive", **process_tags()})
    other_host = running({FLOW_RUN_TAG: "flow-remote", **_dead_process_tags(), HOST_TAG: "elsewhere"})
    untagged = running({})
    own = running({FLOW_RUN_TAG: "flow-crashed"})  # the caller's run is never touched
    finished = running({FLOW_RUN_TAG: "flow-failed"})
    client.set_terminated(finished, "FINISHED")

    final_states = {"flow-crashed": "CRASHED", "flow-failed": "FAILED", "flow-killed": None}
    closed = close_stale_runs(client, experiment_id, final_states.get, keep=[own])

    assert {c["run_id"]: c["status"] for c in closed} == {killed: "KILLED", crashed: "KILLED", failed: "FAILED"}
    for run_id, status in ((killed, "KILLED"), (crashed, "KILLED"), (failed, "FAILED")):
        assert client.get_run(run_id).info.status == status
    reasons = {run_id: client.get_run(run_id).data.tags[END_REASON_TAG] for run_id in (killed, crashed, failed)}
    assert "ended (killed or crashed)" in reasons[killed] and socket.gethostname() in reasons[killed]
    assert "flow-crashed ended (CRASHED)" in reasons[crashed]
    assert "flow-failed ended (FAILED)" in reasons[failed]
    for run_id in (alive, other_host, untagged, own):
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING" and END_REASON_TAG not in run.data.tags
    assert client.get_run(finished).info.status == "FINISHED"
    assert close_stale_runs(client, experiment_id, final_states.get, keep=[own]) == []


def test_crash_and_cancellation_hooks_end_the_flow_runs_mlflow_run(store):
    from types import SimpleNamespace

    from flows.training_pipeline import emonet_training_pipeline, end_mlflow_run_of_flow_run

    assert end_mlflow_run_of_flow_run in emonet_training_pipeline.on_crashed_hooks
    assert end_mlflow_run_of_flow_run in emonet_training_pipeline.on_cancellation_hooks
    client = MlflowClient()
    experiment_id = configure_mlflow(store["uri"], "hooks")
    flow_run_id = "0b7e4c1e-5a43-4c55-9b5e-2b3c4d5e6f70"
    ours = client.create_run(experiment_id, tags={FLOW_RUN_TAG: flow_run_id}).info.run_id
    other = client.create_run(experiment_id, tags={FLOW_RUN_TAG: "another-flow-run"}).info.run_id

    flow_run = SimpleNamespace(id=flow_run_id, parameters={"tracking_uri": store["uri"]})
    state = SimpleNamespace(name="Crashed", message="Execution was aborted by a termination signal.")
    end_mlflow_run_of_flow_run(emonet_training_pipeline, flow_run, state)

    run = client.get_run(ours)
    assert run.info.status == "KILLED"
    assert run.data.tags[END_REASON_TAG] == (
        f"Prefect flow run {flow_run_id} ended Crashed: Execution was aborted by a termination signal."
    )
    assert client.get_run(other).info.status == "RUNNING"


@pytest.mark.slow
def test_demo_flow_registers_apart_and_closes_a_killed_flows_run(prefect_env, tmp_path):
    """A run on the demo data registers `emonet-demo`, never `emonet`, and the next flow
    run closes the MLflow run that a SIGKILLed flow left RUNNING."""
    import uuid

    from emonet.demo_data import make_demo_data
    from flows.training_pipeline import emonet_training_pipeline
    from tasks.model import final_flow_run_state

    demo_dir = make_demo_data(tmp_path / "demo", seed=3, n_train=32, n_val=16, n_test=16, size=48)
    uri = prefect_env["tracking_uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with restored_mlflow_uris():
        experiment_id = configure_mlflow(uri, "registry-flow")
        killed = client.create_run(experiment_id, tags={FLOW_RUN_TAG: str(uuid.uuid4()), **_dead_process_tags()})
        summary = emonet_training_pipeline(
            demo_dir=demo_dir, output_dir=tmp_path / "outputs", experiment_name="registry-flow",
            config={"model": {"backbone": "resnet18"}, "train": {"image_size": 32, "epochs": 1, "num_workers": 0}},
            batch_size=8, visibility_workers=1, visibility_shard_size=16,
        )
    run_id = summary["mlflow_run_id"]
    assert summary["registered_model"] == "emonet-demo"
    assert {v.name for v in client.search_model_versions(f"run_id = '{run_id}'")} == {"emonet-demo"}

    stale = client.get_run(killed.info.run_id)
    assert stale.info.status == "KILLED" and "killed or crashed" in stale.data.tags[END_REASON_TAG]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[PID_TAG] == str(os.getpid())
    assert final_flow_run_state(run.data.tags[FLOW_RUN_TAG]) == "COMPLETED"
    assert final_flow_run_state(str(uuid.uuid4())) is None
