"""The flat layout's module paths after the move into subpackages: every old path imports with a
``FutureWarning`` and serves the new objects, the packages that replaced old modules re-export
their names, the Prefect cache is keyed on the real modules, never a shim, and a model
registered by the previous layout (logged with the code of commit ``c0c7900``) still loads
in a fresh process and is still re-scored and compared by the registry in this one, where
today's ``emonet`` is imported."""

from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import write_fake_archive
from mlflow import MlflowClient

import emonet
import emonet.tracking.registry
from emonet.schema import EMOTIONS, annotations_path, arrays_dir
from emonet.utils.moved_modules import MOVED_MODULES, _MovedModule

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(emonet.__file__).resolve().parent
# The last commit of the flat layout (the move is the commit after it).
PREVIOUS_LAYOUT = "c0c7900"
# Old modules that are packages today, which re-export the old module's names themselves.
NOW_PACKAGES = ("emonet.data", "emonet.models", "emonet.inference", "emonet.tracking")
OLD_MODEL_NAME = "emonet-previous-layout"


def _forget(module_name: str) -> None:
    """Drop a module and its submodules from ``sys.modules``, so that importing it runs it again."""
    for name in [name for name in sys.modules if name == module_name or name.startswith(module_name + ".")]:
        del sys.modules[name]


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args[:3]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="module")
def previous_layout(tmp_path_factory) -> Path:
    """The folder holding the ``emonet`` package as commit c0c7900 had it (``git archive``)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the previous layout's code cannot be extracted")
    check = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{PREVIOUS_LAYOUT}^{{commit}}"], capture_output=True, text=True
    )
    if check.returncode != 0:
        pytest.skip(f"commit {PREVIOUS_LAYOUT} is not available (not a git checkout, or a shallow one): {check.stderr}")
    folder = tmp_path_factory.mktemp("previous-layout")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", PREVIOUS_LAYOUT, "emonet"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    assert (folder / "emonet" / "pyfunc_model.py").is_file()
    return folder


def _old_public_names(old_package: Path, module_name: str) -> list[str]:
    """A module's public names in the previous layout: its ``__all__``, else its top-level
    definitions and assignments without a leading underscore (``logger`` excluded)."""
    relative = Path(*module_name.split("."))
    path = old_package / relative.with_suffix(".py")
    tree = ast.parse((path if path.is_file() else old_package / relative / "__init__.py").read_text())
    names = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return list(ast.literal_eval(node.value))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            names += [t.id for t in targets if isinstance(t, ast.Name)]
    return [name for name in names if not name.startswith("_") and name != "logger"]


# --------------------------------------------------------------------------- the old paths


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_an_old_path_imports_with_a_future_warning(old):
    _forget(old)
    with pytest.warns(FutureWarning, match=rf"{old.replace('.', '[.]')} is deprecated since EmoNet 0.2"):
        module = importlib.import_module(old)
    assert isinstance(module, _MovedModule) and module.__emonet_targets__ == MOVED_MODULES[old]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert importlib.import_module(old) is module  # warned once, on the first import


def test_an_old_path_serves_the_new_objects_and_star_imports():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from emonet.checkpoint import resolve_device
        from emonet.inference import Predictor

        namespace: dict = {}
        exec("from emonet.images import *", namespace)
    from emonet.data.images import read_image
    from emonet.inference.predictor import Predictor as NewPredictor
    from emonet.models.devices import resolve_device as new_resolve_device

    assert resolve_device is new_resolve_device and Predictor is NewPredictor
    assert namespace["read_image"] is read_image
    with pytest.raises(AttributeError, match="moved to emonet.data.images"):
        _ = sys.modules["emonet.images"].no_such_name


def test_every_old_public_name_is_the_new_object(previous_layout):
    """Each name the old modules exported is served by its old path, as the object of a
    module it moved to; the packages that replaced old modules re-export them."""
    absent, missing = object(), []
    for old, targets in MOVED_MODULES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            shim = importlib.import_module(old)
        news = [importlib.import_module(target) for target in targets]
        for name in _old_public_names(previous_layout, old):
            served = getattr(shim, name, absent)
            if served is absent or not any(getattr(new, name, absent) is served for new in news):
                missing.append(f"{old}.{name}")
    for package in NOW_PACKAGES:
        module = importlib.import_module(package)
        for name in _old_public_names(previous_layout, package):
            value = getattr(module, name, absent)
            defined_in = getattr(value, "__module__", package) or package
            if value is absent or not defined_in.startswith(package):
                missing.append(f"{package}.{name}")
    assert not missing, f"old names that no longer import as the new objects: {missing}"


def test_the_old_pyfunc_model_files_imports_are_served(previous_layout):
    """The old model file's own ``from emonet... import`` lines, run against today's package."""
    tree = ast.parse((previous_layout / "emonet" / "pyfunc_model.py").read_text())
    imports = [node for node in tree.body if isinstance(node, ast.ImportFrom) and node.module.startswith("emonet")]
    assert {node.module for node in imports} >= {"emonet.checkpoint", "emonet.images", "emonet.inference"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for node in imports:
            exec(ast.unparse(node), {})


def test_the_prefect_cache_is_keyed_on_real_modules_never_a_shim():
    """tasks.caching fingerprints module sources: each must be today's own file, not a shim."""
    from tasks import caching

    for name in caching.VISIBILITY_MODULES + caching.NORMALIZE_MODULES:
        assert name not in MOVED_MODULES, f"{name} is an old path served by a shim"
        module = importlib.import_module(name)
        assert not isinstance(module, _MovedModule)
        source = Path(module.__file__).resolve()
        assert source == PACKAGE_DIR.parent.joinpath(*name.split(".")).with_suffix(".py"), (name, source)
        assert "moved_modules" not in source.read_text(), f"{source} holds compatibility code"


# --------------------------------------------------------------------------- a model of the previous layout

# Run with the previous layout's package: a random-init ResNet-18 at 32 px, logged and
# registered as champion by that code's own functions, and its own re-scoring of the split.
OLD_LAYOUT_SCRIPT = """
import json, sys
from pathlib import Path

import emonet

uri, name, split_csv, img_dir, out = sys.argv[1:6]
import torch
from mlflow import MlflowClient

from emonet.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, save_checkpoint
from emonet.config import config_to_dict, load_config
from emonet.models import build_model
from emonet.registry import predict_model_on_split, promote_model
from emonet.tracking import configure_mlflow, log_emonet_model

torch.manual_seed(0)
config = load_config(model={"backbone": "resnet18"}, train={"image_size": 32, "device": "cpu", "num_workers": 0})
model = build_model(config.model, pretrained=False)
payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "model": model.state_dict(),
           "config": config_to_dict(config), "epoch": 1, "thresholds": None}
checkpoint = save_checkpoint(payload, Path("best.pt").resolve())
experiment_id = configure_mlflow(uri, "previous-layout")
client = MlflowClient()
run_id = client.create_run(experiment_id).info.run_id
version = log_emonet_model(run_id, checkpoint, None, None, name, device="cpu")
# Champion on another split, so a comparison on this one re-scores it.
decision = promote_model(client, name, version.version, 0.5, "sha256:another-split", run_id, split="val",
                         confidence=0.0)
predictions = predict_model_on_split(f"models:/{name}@champion", split_csv, img_dir)
result = {"emonet_file": emonet.__file__, "version": str(version.version), "run_id": run_id,
          "decision": decision.decision, "alias": decision.alias, "indices": predictions.indices.tolist(),
          "emotion_prob": predictions.emotion_prob.tolist(), "affect_pred": predictions.affect_pred.tolist()}
Path(out).write_text(json.dumps(result))
"""

# A fresh process that never imported emonet loads the champion as MLflow serves it.
FRESH_LOAD_SCRIPT = """
import json, sys
import mlflow
import pandas as pd

uri, name, paths, columns = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
mlflow.set_tracking_uri(uri)
mlflow.set_registry_uri(uri)
model = mlflow.pyfunc.load_model(f"models:/{name}@champion", model_config={"inference_device": "cpu"})
frame = model.predict(pd.DataFrame({"image_path": paths}))
import emonet
print(json.dumps({"emonet_file": emonet.__file__, "checkpoint_file": sys.modules["emonet.checkpoint"].__file__,
                  "prob": frame[columns].to_numpy().tolist()}))
"""


def _environment(pythonpath: Path | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


@pytest.fixture(scope="module")
def old_champion(previous_layout, tmp_path_factory) -> dict:
    """A champion logged and registered by the previous layout into a SQLite store, with
    that code's own predictions on the validation split of a small archive."""
    base = tmp_path_factory.mktemp("old-champion")
    root = write_fake_archive(base / "emotic", rows_per_split=6)
    uri = f"sqlite:///{base / 'mlflow.db'}"
    out = base / "old-layout.json"
    split_csv, img_dir = annotations_path(root, "val"), arrays_dir(root)
    args = [uri, OLD_MODEL_NAME, str(split_csv), str(img_dir), str(out)]
    _run([sys.executable, "-c", OLD_LAYOUT_SCRIPT, *args], cwd=previous_layout, env=_environment(previous_layout))
    result = json.loads(out.read_text())
    assert Path(result["emonet_file"]) == previous_layout / "emonet" / "__init__.py", (
        f"the script ran today's emonet ({result['emonet_file']}), not the previous layout's"
    )
    assert (result["decision"], result["alias"]) == ("first_version", "champion")
    return {**result, "uri": uri, "split_csv": split_csv, "img_dir": img_dir, "base": base}


@pytest.mark.slow
def test_an_old_champion_loads_in_a_fresh_process(old_champion, tmp_path):
    """``mlflow.pyfunc.load_model`` in a process that never saw today's package: the model
    runs the copy of the old package it was logged with, and predicts as the old code did."""
    crops = pd.read_csv(old_champion["split_csv"])["Crop_name"]
    paths = [str(old_champion["img_dir"] / name) for name in crops]
    columns = [f"prob_{emotion}" for emotion in EMOTIONS]
    args = [old_champion["uri"], OLD_MODEL_NAME, json.dumps(paths), json.dumps(columns)]
    fresh = _run([sys.executable, "-c", FRESH_LOAD_SCRIPT, *args], cwd=tmp_path, env=_environment(None))
    loaded = json.loads(fresh.stdout.strip().splitlines()[-1])
    emonet_file = Path(loaded["emonet_file"]).resolve()
    assert PACKAGE_DIR not in emonet_file.parents, f"the fresh process ran today's emonet: {emonet_file}"
    assert emonet_file.parent.parent.name == "code", f"not the model's logged copy of the package: {emonet_file}"
    assert Path(loaded["checkpoint_file"]).name == "checkpoint.py"  # the old module itself, not a shim
    expected = np.asarray(old_champion["emotion_prob"])[np.argsort(old_champion["indices"])]
    np.testing.assert_allclose(np.asarray(loaded["prob"]), expected, atol=1e-5)


@pytest.mark.slow
def test_an_old_champion_is_rescored_and_compared_in_this_process(old_champion, monkeypatch):
    """In the flow's process (today's emonet imported), the registry re-scores the old
    champion with the function promote_model uses, gets the old code's predictions, and a
    new version is then decided by the evidence, not ``champion_unloadable``."""
    from emonet.reports.evaluation import split_fingerprint
    from emonet.tracking.registry import CHALLENGER, CHAMPION, predict_model_on_split, promote_model

    uri = old_champion["uri"]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert "emonet.tracking.registry" in sys.modules and Path(emonet.__file__).resolve().parent == PACKAGE_DIR
    champion_uri = f"models:/{OLD_MODEL_NAME}/{old_champion['version']}"
    rescored = []

    def spying_predict(*args):
        rescored.append(predict_model_on_split(*args))
        return rescored[-1]

    monkeypatch.setattr(emonet.tracking.registry, "predict_model_on_split", spying_predict)
    split_csv, img_dir = old_champion["split_csv"], old_champion["img_dir"]
    with pytest.warns(FutureWarning, match="emonet.checkpoint is deprecated"):
        _forget("emonet.checkpoint")  # so that this load imports the old path again, and warns
        own = spying_predict(champion_uri, split_csv, img_dir)
    np.testing.assert_array_equal(own.indices, old_champion["indices"])
    np.testing.assert_allclose(own.emotion_prob, np.asarray(old_champion["emotion_prob"]), atol=1e-5)
    np.testing.assert_allclose(own.affect_pred, np.asarray(old_champion["affect_pred"]), atol=1e-5)

    # A new version with the same predictions: the evidence says it is no better.
    run_id = client.create_run(client.get_run(old_champion["run_id"]).info.experiment_id).info.run_id
    source = client.get_model_version(OLD_MODEL_NAME, old_champion["version"]).source
    version = str(client.create_model_version(OLD_MODEL_NAME, source, run_id=run_id).version)
    split_id = split_fingerprint(pd.read_csv(split_csv))
    result = promote_model(
        client, OLD_MODEL_NAME, version, own, split_id, run_id, split_csv=split_csv, img_dir=img_dir, n_resamples=100
    )
    assert len(rescored) == 2, "the champion was not re-scored by promote_model"
    np.testing.assert_allclose(rescored[-1].emotion_prob, own.emotion_prob, atol=1e-6)
    assert (result.decision, result.alias, result.error) == ("not_significantly_better", CHALLENGER, None)
    assert result.previous_version == old_champion["version"] and result.difference is not None
    assert result.difference.estimate == pytest.approx(0.0, abs=1e-6)
    aliases = {alias: str(v) for alias, v in client.get_registered_model(OLD_MODEL_NAME).aliases.items()}
    assert aliases == {CHAMPION: old_champion["version"], CHALLENGER: version}
