"""The ONNX export of a registered model and ONNX Runtime behind the pyfunc: the export
runs in a plain onnxruntime session, matches torch, fails without costing the
registration, and the runtime is picked and refused as documented."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from conftest import restored_mlflow_uris
from mlflow import MlflowClient
from PIL import Image

import emonet.tracking.model_export as model_export
from emonet.config import config_to_dict, load_config
from emonet.data.annotations import load_annotations
from emonet.inference.loading import load_predictor
from emonet.inference.onnx_runtime import OnnxModel, resolve_runtime
from emonet.inference.predictor import PROB_COLUMNS, Predictor
from emonet.models.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, save_checkpoint
from emonet.models.network import build_model
from emonet.models.onnx_export import ONNX_FILE, export_onnx
from emonet.schema import EMOTIONS, IMAGENET_MEAN, annotations_path, arrays_dir
from emonet.tracking.model_export import INT8_EXPORT_TAG, ONNX_EXPORT_TAG, export_checked_onnx
from emonet.tracking.run_logging import configure_mlflow, log_emonet_model

REPO = Path(__file__).resolve().parents[1]
DOCS_PAGE = REPO / "docs" / "onnx.md"


def _config(variant: str = "body"):
    return load_config(model={"backbone": "resnet18", "variant": variant}, train={"image_size": 32, "context_size": 48})


def _random_checkpoint(path: Path, variant: str = "body") -> Path:
    """A serving checkpoint of a random-init ResNet-18 at 32 px (48 px scenes)."""
    config = _config(variant)
    torch.manual_seed(0)
    model = build_model(config.model, pretrained=False).eval()
    checkpoint = {
        "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "model": model.state_dict(),
        "config": config_to_dict(config), "thresholds": [0.3] * len(EMOTIONS), "epoch": 1, "best_metric": 0.1,
        "best_epoch": 1, "history": [], "serving": True,
    }  # fmt: skip
    return save_checkpoint(checkpoint, path)


@pytest.mark.parametrize("variant", ["body", "body_context"])
def test_the_export_runs_in_plain_onnxruntime_with_any_batch_and_matches_torch(tmp_path: Path, variant: str) -> None:
    config = _config(variant)
    model = build_model(config.model, pretrained=False).train()
    path = export_onnx(model, config, tmp_path / ONNX_FILE)
    assert model.training, "the model is left in the mode it was found in"

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {entry.name: (entry.shape, entry.type) for entry in session.get_inputs()}
    expected = {"body": (["batch", 3, 32, 32], "tensor(float)")}
    if variant == "body_context":
        expected["context"] = (["batch", 3, 48, 48], "tensor(float)")
    assert inputs == expected
    outputs = {entry.name: entry.shape for entry in session.get_outputs()}
    assert outputs == {
        "emotion_prob": ["batch", 26],
        "affect": ["batch", 2],
        "emotion_logits": ["batch", 26],
        "features": ["batch", model.num_features],
    }
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["emonet.emotions"]) == list(EMOTIONS)
    assert json.loads(meta["emonet.mean"]) == list(IMAGENET_MEAN) and meta["emonet.variant"] == variant

    model.eval()
    for batch in (1, 5):  # the batch axis is dynamic
        feeds = {name: np.random.default_rng(batch).standard_normal((batch, *shape[1:]), dtype=np.float32)
                 for name, (shape, _) in expected.items()}  # fmt: skip
        prob, affect, logits, features = session.run(None, feeds)
        with torch.inference_mode():
            output = model(*(torch.from_numpy(feeds[name]) for name in expected))
        assert prob.shape == (batch, 26) and affect.shape == (batch, 2)
        np.testing.assert_allclose(prob, torch.sigmoid(output.emotion_logits).numpy(), atol=1e-4)
        np.testing.assert_allclose(affect, output.affect.numpy(), atol=1e-4)
        np.testing.assert_allclose(prob, 1 / (1 + np.exp(-logits)), atol=1e-6)
        np.testing.assert_allclose(features, output.features.numpy(), atol=1e-4)


def test_a_failed_export_or_check_costs_the_export_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = _random_checkpoint(tmp_path / "serving.pt")

    def unsupported(*args, **kwargs):
        raise RuntimeError("aten::frobnicate has no ONNX translation\n(long exporter report)")

    with monkeypatch.context() as patch:
        patch.setattr(model_export, "export_onnx", unsupported)
        failed = export_checked_onnx(checkpoint, tmp_path / ONNX_FILE)
    assert failed.path is None and not (tmp_path / ONNX_FILE).exists()
    assert failed.tag == (
        "failed: RuntimeError: aten::frobnicate has no ONNX translation; the model serves with torch only"
    )

    # A difference over the tolerance is a failure too, and the file does not stay.
    monkeypatch.setattr(model_export, "ONNX_TOLERANCE", -1.0)
    over = export_checked_onnx(checkpoint, tmp_path / ONNX_FILE)
    assert over.path is None and not (tmp_path / ONNX_FILE).exists()
    assert re.match(r"failed: ValueError: ONNX Runtime differs from torch by .* on 8 random images", over.tag)


def test_the_runtime_is_picked_and_refused_as_documented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exported = tmp_path / ONNX_FILE
    exported.touch()
    assert resolve_runtime("auto", exported, "cpu") == "onnxruntime"
    assert resolve_runtime("auto", None, "cpu") == "torch"
    assert resolve_runtime("auto", exported, "cuda") == "torch"  # ONNX Runtime's CUDA build is not installed
    assert resolve_runtime("torch", exported, "cpu") == "torch"
    with monkeypatch.context() as patch:  # an environment made by hand, without onnxruntime
        patch.setattr(importlib.util, "find_spec", lambda name: None)
        assert resolve_runtime("auto", exported, "cpu") == "torch"
    with pytest.raises(ValueError, match="needs the model's ONNX export, and this model has none"):
        resolve_runtime("onnxruntime", tmp_path / "missing.onnx", "cpu")
    with pytest.raises(ValueError, match="runs on the CPU, but inference_device is cuda"):
        resolve_runtime("onnxruntime", exported, "cuda")
    every = "auto, onnxruntime, onnxruntime-int8, torch"
    with pytest.raises(ValueError, match=f"inference_runtime must be one of {every}, got 'tensorrt'"):
        resolve_runtime("tensorrt", exported, "cpu")
    checkpoint = _random_checkpoint(tmp_path / "serving.pt")
    with pytest.raises(ValueError, match="is a checkpoint file: pass its models:/ URI"):
        load_predictor(checkpoint, runtime="onnxruntime")
    with pytest.raises(ValueError, match=f"runtime must be one of {every}, got 'fast'"):
        load_predictor(checkpoint, runtime="fast")
    assert load_predictor(checkpoint, device="cpu").runtime == "torch"


def test_onnx_runtime_threads_follow_torch(tmp_path: Path) -> None:
    checkpoint = _random_checkpoint(tmp_path / "serving.pt")
    export = export_checked_onnx(checkpoint, tmp_path / ONNX_FILE)
    assert export.path is not None, export.tag
    config = _config()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what OMP_NUM_THREADS=cores/WORKERS gives each server worker
        assert OnnxModel(export.path, config.model).threads == 1
    finally:
        torch.set_num_threads(before)
    assert OnnxModel(export.path, config.model, threads=2).threads == 2
    predictor = Predictor.from_checkpoint(checkpoint, onnx_path=export.path, runtime="auto")
    torch_predictor = Predictor.from_checkpoint(checkpoint)
    assert (predictor.runtime, torch_predictor.runtime) == ("onnxruntime", "torch")
    crops = [np.random.default_rng(i).integers(0, 256, (40, 30, 3), dtype=np.uint8) for i in range(3)]
    np.testing.assert_allclose(predictor.predict_proba(crops)[0], torch_predictor.predict_proba(crops)[0], atol=1e-4)
    with pytest.raises(ValueError, match=r"takes inputs \['body'\], but an EmoNet body_context export takes"):
        OnnxModel(export.path, _config("body_context").model)


# --------------------------------------------------------------------------- registered models


@pytest.fixture(scope="module")
def onnx_store(tmp_path_factory, tiny_checkpoint):
    """``emonet-onnx`` version 1 with its export (checked on the validation split) and its
    INT8 copy, and version 2 registered without either, as a model of an earlier release is."""
    base = tmp_path_factory.mktemp("onnx-store")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    root = tiny_checkpoint["root"]
    with restored_mlflow_uris():
        experiment_id = configure_mlflow(uri, "emonet-onnx", base / "artifacts")
        client = MlflowClient()
        run_id = client.create_run(experiment_id).info.run_id
        exported = log_emonet_model(
            run_id,
            tiny_checkpoint["checkpoint"],
            registered_model_name="emonet-onnx",
            check_csv=annotations_path(root, "val"),
            img_dir=arrays_dir(root),
            device="cpu",
            quantize="int8",
        )
        torch_only = log_emonet_model(
            run_id, tiny_checkpoint["checkpoint"], registered_model_name="emonet-onnx", onnx=False, device="cpu"
        )
        yield {"uri": uri, "root": root, "exported": exported, "torch_only": torch_only, "run_id": run_id}


def _test_crops(root: Path) -> pd.DataFrame:
    """The archive's test crops as an ``image_path`` table."""
    crops = load_annotations(annotations_path(root, "test"))["Crop_name"]
    return pd.DataFrame({"image_path": [str(arrays_dir(root) / name) for name in crops]})


@pytest.mark.slow
def test_a_registered_model_serves_with_onnxruntime_and_matches_torch(onnx_store) -> None:
    exported, torch_only = onnx_store["exported"], onnx_store["torch_only"]
    assert re.fullmatch(
        r"checked: largest difference \S+ from torch on 6 crops of annot_arrs_val.csv \(tolerance 1e-04\)",
        exported.tags[ONNX_EXPORT_TAG],
    )
    assert torch_only.tags[ONNX_EXPORT_TAG] == "not exported (onnx=False)"
    table = _test_crops(onnx_store["root"])
    with restored_mlflow_uris():
        mlflow.set_tracking_uri(onnx_store["uri"])
        mlflow.set_registry_uri(onnx_store["uri"])
        served = {
            runtime: mlflow.pyfunc.load_model(
                f"models:/emonet-onnx/{exported.version}", model_config={"inference_runtime": runtime}
            )
            for runtime in ("auto", "torch")
        }
        assert served["auto"].unwrap_python_model().predictor.runtime == "onnxruntime"
        assert served["torch"].unwrap_python_model().predictor.runtime == "torch"
        fast, reference = (served[runtime].predict(table) for runtime in ("auto", "torch"))
        np.testing.assert_allclose(fast[list(PROB_COLUMNS)], reference[list(PROB_COLUMNS)], atol=1e-4)
        np.testing.assert_allclose(fast[["valence", "arousal"]], reference[["valence", "arousal"]], atol=1e-4)

        # A version without an export (an earlier release's, or a failed export) runs with torch.
        old = f"models:/emonet-onnx/{torch_only.version}"
        assert mlflow.pyfunc.load_model(old).unwrap_python_model().predictor.runtime == "torch"
        assert load_predictor(old, device="cpu").runtime == "torch"
        with pytest.raises(ValueError, match="needs the model's ONNX export, and this model has none"):
            mlflow.pyfunc.load_model(old, model_config={"inference_runtime": "onnxruntime"})


@pytest.mark.slow
def test_the_docs_example_runs_the_export_without_emonet_and_matches_pyfunc(onnx_store, tmp_path: Path) -> None:
    """The page's ten lines, run as written in a process that cannot import emonet."""
    snippet = re.search(r"<!-- plain-onnxruntime -->\s*```python\n(.*?)```", DOCS_PAGE.read_text(), re.S)
    assert snippet, f"{DOCS_PAGE} lost its plain onnxruntime example"
    with restored_mlflow_uris():
        mlflow.set_tracking_uri(onnx_store["uri"])
        model_uri = f"models:/emonet-onnx/{onnx_store['exported'].version}"
        model_dir = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "emonet-model")))
        pyfunc = mlflow.pyfunc.load_model(model_uri)
        size = pyfunc.unwrap_python_model().predictor.image_size
        rng = np.random.default_rng(3)
        # A crop already at the input size is resized by neither side: the tensors are equal.
        # Another size goes through PIL's bilinear resize here and torchvision's there
        # (within one grey level), so its probabilities agree more loosely.
        for name, shape, atol in (("same.png", (size, size, 3), 1e-4), ("other.png", (57, 41, 3), 2e-2)):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / name)
            script = (
                "import sys\nsys.modules['emonet'] = None  # no EmoNet code\n"
                + snippet.group(1).replace('"crop.png"', repr(name)).replace('"emonet-model"', repr(str(model_dir)))
                + "np.save('out.npy', np.concatenate([prob, affect], axis=1))\n"
            )
            run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
            assert run.returncode == 0, run.stderr[-2000:]
            plain = np.load(tmp_path / "out.npy")
            expected = pyfunc.predict(pd.DataFrame({"image_path": [str(tmp_path / name)]}))
            np.testing.assert_allclose(plain[0, :26], expected[list(PROB_COLUMNS)].to_numpy()[0], atol=atol)
            np.testing.assert_allclose(plain[0, 26:], expected[["valence", "arousal"]].to_numpy()[0], atol=atol)


@pytest.mark.slow
def test_the_int8_export_is_measured_on_validation_and_served_only_when_asked(onnx_store, tiny_checkpoint) -> None:
    exported = onnx_store["exported"]
    assert re.fullmatch(
        r"validation mAP \(scikit-learn AP\) of INT8 minus float: [+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\] "
        r"\(95% paired bootstrap, 1000 resamples\) on 6 crops of annot_arrs_val.csv; "
        r"served only with inference_runtime 'onnxruntime-int8'",
        exported.tags[INT8_EXPORT_TAG],
    ), exported.tags[INT8_EXPORT_TAG]
    client = MlflowClient(tracking_uri=onnx_store["uri"])
    metrics = client.get_run(onnx_store["run_id"]).data.metrics
    low, estimate, high = (metrics[f"int8_val_mAP_difference{end}"] for end in ("_low", "", "_high"))
    assert low <= estimate <= high
    table = _test_crops(onnx_store["root"])
    with restored_mlflow_uris():
        mlflow.set_tracking_uri(onnx_store["uri"])
        mlflow.set_registry_uri(onnx_store["uri"])
        uri = f"models:/emonet-onnx/{exported.version}"
        int8 = mlflow.pyfunc.load_model(uri, model_config={"inference_runtime": "onnxruntime-int8"})
        assert int8.unwrap_python_model().predictor.runtime == "onnxruntime-int8"
        assert load_predictor(uri, device="cpu").runtime == "onnxruntime", "auto never picks INT8"
        float_out = mlflow.pyfunc.load_model(uri).predict(table)
        np.testing.assert_allclose(int8.predict(table)[list(PROB_COLUMNS)], float_out[list(PROB_COLUMNS)], atol=0.1)
        with pytest.raises(ValueError, match="needs the model's INT8 export, and this model has none"):
            mlflow.pyfunc.load_model(
                f"models:/emonet-onnx/{onnx_store['torch_only'].version}",
                model_config={"inference_runtime": "onnxruntime-int8"},
            )
        with pytest.raises(ValueError, match="quantize must be one of int8 or None, got 'int4'"):
            log_emonet_model(onnx_store["run_id"], tiny_checkpoint["checkpoint"], quantize="int4")
        with pytest.raises(ValueError, match="needs the ONNX export .* and validation crops"):
            log_emonet_model(onnx_store["run_id"], tiny_checkpoint["checkpoint"], quantize="int8")
