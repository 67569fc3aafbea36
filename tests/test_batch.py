"""Batch inference over a CSV: both input layouts, the documented output columns, row
errors that name the row, the skip option, and the input file never overwritten."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_images import sparse_npy

from emonet.config import load_config
from emonet.data.arrays import load_array
from emonet.inference.csv_scoring import ID_COLUMNS, predict_csv, skipped_path
from emonet.inference.loading import is_mlflow_uri, load_predictor
from emonet.inference.predictor import OUTPUT_COLUMNS, PROB_COLUMNS, Predictor
from emonet.models.checkpoint import read_checkpoint
from emonet.models.network import build_model
from emonet.schema import EMOTIONS, annotations_path, arrays_dir

TINY = {"image_size": 32, "epochs": 1, "batch_size": 8, "num_workers": 0, "device": "cpu", "augment": False}


@pytest.fixture(scope="module")
def predictor(demo_checkpoint):
    return Predictor.from_checkpoint(demo_checkpoint[1])


def _reference(predictor, root, names):
    """Predictions of the same crops straight from the Predictor."""
    return predictor.predict_frame([load_array(arrays_dir(root), name) for name in names])


def test_archive_layout_writes_one_row_per_input(demo_checkpoint, predictor, tmp_path):
    root, checkpoint = demo_checkpoint
    csv_path = annotations_path(root, "test")
    before = csv_path.read_bytes()
    out = tmp_path / "pred" / "test_predictions.csv"
    # batch_size 4 on 11 rows: three chunks, the last one partial.
    summary = predict_csv(checkpoint, csv_path, out, img_dir=arrays_dir(root), batch_size=4, progress=False)

    source = pd.read_csv(csv_path)
    result = pd.read_csv(out, keep_default_na=False)
    assert list(result.columns) == ["row", "Filename", "Crop_name", "Arr_name", *OUTPUT_COLUMNS]
    assert len(result) == len(source) == 11
    assert result["row"].tolist() == list(range(11))
    assert result["Crop_name"].tolist() == source["Crop_name"].tolist()
    reference = _reference(predictor, root, source["Crop_name"])
    np.testing.assert_allclose(result[list(PROB_COLUMNS)], reference[list(PROB_COLUMNS)], atol=1e-5)
    np.testing.assert_allclose(result["valence_1_10"], reference["valence_1_10"], atol=1e-4)
    assert result["emotions"].tolist() == reference["emotions"].tolist()
    # The emotion sets follow the checkpoint's thresholds.
    probs = result[list(PROB_COLUMNS)].to_numpy()
    for text, row in zip(result["emotions"], probs):
        assert text == ";".join(e for e, p, t in zip(EMOTIONS, row, predictor.thresholds) if p >= t - 1e-6)
    assert summary["rows_read"] == summary["rows_written"] == 11 and summary["rows_skipped"] == 0
    assert summary["layout"] == "archive" and summary["skipped_csv"] is None
    assert csv_path.read_bytes() == before
    assert not list(out.parent.glob("*.tmp"))


def test_image_path_layout_reads_npy_png_and_relative_paths(demo_checkpoint, predictor, tmp_path):
    root, _ = demo_checkpoint
    names = pd.read_csv(annotations_path(root, "test"))["Crop_name"].tolist()[:5]
    (tmp_path / "crops").mkdir()
    paths = []
    for i, name in enumerate(names):
        array = np.asarray(load_array(arrays_dir(root), name))
        if i % 2:
            # Lossless PNG: the same pixels as the .npy, so the same predictions.
            Image.fromarray(array).save(tmp_path / "crops" / f"crop_{i}.png")
            paths.append(f"crops/crop_{i}.png")  # relative to the CSV's folder
        else:
            np.save(tmp_path / "crops" / f"crop_{i}.npy", array)
            paths.append(str(tmp_path / "crops" / f"crop_{i}.npy"))
    csv_path = tmp_path / "to_score.csv"
    pd.DataFrame({"id": [f"00{i}" for i in range(5)], "image_path": paths}).to_csv(csv_path, index=False)

    out = tmp_path / "scored.csv"
    summary = predict_csv(predictor, csv_path, out, batch_size=2, progress=False, keep_columns=["id"])
    result = pd.read_csv(out, dtype={"id": str}, keep_default_na=False)
    assert list(result.columns) == ["row", "image_path", "id", *OUTPUT_COLUMNS]
    assert result["id"].tolist() == ["000", "001", "002", "003", "004"]  # kept as text
    assert result["image_path"].tolist() == paths
    reference = _reference(predictor, root, names)
    np.testing.assert_allclose(result[list(PROB_COLUMNS)], reference[list(PROB_COLUMNS)], atol=1e-5)
    assert summary["layout"] == "paths" and summary["rows_written"] == 5


def test_output_never_overwrites_the_input(demo_checkpoint, predictor, tmp_path):
    root, _ = demo_checkpoint
    csv_path = tmp_path / "copy.csv"
    csv_path.write_bytes(annotations_path(root, "test").read_bytes())
    before = csv_path.read_bytes()
    (tmp_path / "symlink.csv").symlink_to(csv_path)
    os.link(csv_path, tmp_path / "hardlink.csv")
    for target in (csv_path, tmp_path / "sub" / ".." / "copy.csv", tmp_path / "symlink.csv", tmp_path / "hardlink.csv"):
        with pytest.raises(ValueError, match=f"out_csv {target} must differ from the input input CSV {csv_path}"):
            predict_csv(predictor, csv_path, target, img_dir=arrays_dir(root), progress=False)
    # The list of skipped rows is an output too.
    (tmp_path / "out.skipped.csv").symlink_to(csv_path)
    with pytest.raises(ValueError, match="skipped_csv .*out.skipped.csv must differ from the input"):
        predict_csv(predictor, csv_path, tmp_path / "out.csv", img_dir=arrays_dir(root), on_error="skip")
    assert csv_path.read_bytes() == before


def test_bad_row_is_named_and_nothing_is_written(demo_checkpoint, predictor, tmp_path):
    root, _ = demo_checkpoint
    frame = pd.read_csv(annotations_path(root, "test"))
    frame.loc[6, "Crop_name"] = "crop_arr_test_missing.npy"
    csv_path = tmp_path / "broken.csv"
    frame.to_csv(csv_path, index=False)
    out = tmp_path / "out.csv"
    with pytest.raises(FileNotFoundError, match=r"broken.csv: row 6: .*crop_arr_test_missing.npy"):
        predict_csv(predictor, csv_path, out, img_dir=arrays_dir(root), batch_size=4, progress=False)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_skip_option_records_skipped_rows(demo_checkpoint, predictor, tmp_path):
    root, _ = demo_checkpoint
    frame = pd.read_csv(annotations_path(root, "test"))
    frame.loc[2, "Crop_name"] = "crop_arr_test_missing.npy"
    frame.loc[9, "Crop_name"] = "../escape.npy"
    csv_path = tmp_path / "broken.csv"
    frame.to_csv(csv_path, index=False)
    out = tmp_path / "out.csv"
    summary = predict_csv(
        predictor, csv_path, out, img_dir=arrays_dir(root), batch_size=4, progress=False, on_error="skip"
    )
    result = pd.read_csv(out)
    assert result["row"].tolist() == [r for r in range(11) if r not in (2, 9)]
    assert summary["rows_read"] == 11 and summary["rows_written"] == 9 and summary["rows_skipped"] == 2
    skipped = pd.read_csv(skipped_path(out))
    assert summary["skipped_csv"] == str(skipped_path(out))
    assert skipped["row"].tolist() == [2, 9]
    assert skipped["Crop_name"].tolist() == ["crop_arr_test_missing.npy", "../escape.npy"]
    assert "not found" in skipped["reason"][0] and "plain file name" in skipped["reason"][1]
    assert [entry["row"] for entry in summary["skipped"]] == [2, 9]


def test_input_errors_are_clear(demo_checkpoint, predictor, tmp_path):
    root, _ = demo_checkpoint
    csv_path = annotations_path(root, "test")
    with pytest.raises(ValueError, match="pass img_dir"):
        predict_csv(predictor, csv_path, tmp_path / "a.csv", progress=False)
    no_image = tmp_path / "no_image.csv"
    pd.DataFrame({"id": [1]}).to_csv(no_image, index=False)
    with pytest.raises(ValueError, match="needs an 'image_path' column"):
        predict_csv(predictor, no_image, tmp_path / "b.csv", progress=False)
    with pytest.raises(ValueError, match="unknown on_error 'ignore'"):
        predict_csv(predictor, csv_path, tmp_path / "c.csv", img_dir=arrays_dir(root), on_error="ignore")
    with pytest.raises(ValueError, match="keep_columns not in"):
        predict_csv(predictor, csv_path, tmp_path / "d.csv", img_dir=arrays_dir(root), keep_columns=["nope"])
    with pytest.raises(FileNotFoundError, match="input CSV not found"):
        predict_csv(predictor, tmp_path / "missing.csv", tmp_path / "e.csv")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_predictor(tmp_path / "missing.pt")


def test_oversize_crop_is_skipped_or_named_before_its_pixels_are_read(demo_checkpoint, predictor, tmp_path):
    # A crop whose header declares 100000 x 100000 x 3 (30 GB; a sparse file here): reading
    # it raised MemoryError, even with on_error="skip".
    root, _ = demo_checkpoint
    img_dir = tmp_path / "img_arrs"
    img_dir.mkdir()
    frame = pd.read_csv(annotations_path(root, "test"))
    for name in frame["Crop_name"]:
        shutil.copy(arrays_dir(root) / name, img_dir / name)
    sparse_npy(img_dir / "crop_arr_test_huge.npy", (100_000, 100_000, 3))
    frame.loc[3, "Crop_name"] = "crop_arr_test_huge.npy"
    csv_path = tmp_path / "huge.csv"
    frame.to_csv(csv_path, index=False)
    out = tmp_path / "out.csv"

    summary = predict_csv(predictor, csv_path, out, img_dir=img_dir, batch_size=4, progress=False, on_error="skip")
    assert summary["rows_written"] == 10 and [s["row"] for s in summary["skipped"]] == [3]
    assert (
        "crop_arr_test_huge.npy: image of 100000 x 100000 = 10,000,000,000 pixels is over the limit"
        in (summary["skipped"][0]["reason"])
    )
    assert 3 not in pd.read_csv(out)["row"].tolist()
    with pytest.raises(ValueError, match="huge.csv: row 3: crop_arr_test_huge.npy: image of 100000 x 100000"):
        predict_csv(predictor, csv_path, tmp_path / "raised.csv", img_dir=img_dir, batch_size=4, progress=False)
    # The limit is a parameter, for the image_path layout too.
    paths_csv = tmp_path / "paths.csv"
    pd.DataFrame({"image_path": [str(img_dir / frame.loc[0, "Crop_name"])]}).to_csv(paths_csv, index=False)
    with pytest.raises(
        ValueError, match="paths.csv: row 0: .*image of 40 x 40 = 1,600 pixels is over the limit of 1,599"
    ):
        predict_csv(predictor, paths_csv, tmp_path / "small.csv", progress=False, max_pixels=1599)
    assert (
        predict_csv(predictor, paths_csv, tmp_path / "small.csv", progress=False, max_pixels=1600)["rows_written"] == 1
    )
    with pytest.raises(ValueError, match="max_pixels must be a positive int"):
        predict_csv(predictor, paths_csv, tmp_path / "small.csv", progress=False, max_pixels=0)


def test_binary_input_csv_is_named(predictor, tmp_path):
    binary = tmp_path / "photo.csv"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match=f"{binary}: not a CSV file"):
        predict_csv(predictor, binary, tmp_path / "out.csv", progress=False)


def test_header_only_csv_gives_header_only_output(predictor, tmp_path):
    csv_path = tmp_path / "empty.csv"
    csv_path.write_text("image_path\n")
    out = tmp_path / "out.csv"
    summary = predict_csv(predictor, csv_path, out, progress=False)
    assert list(pd.read_csv(out).columns) == ["row", "image_path", *OUTPUT_COLUMNS]
    assert summary["rows_read"] == summary["rows_written"] == 0


def test_body_context_model_reads_the_full_image(demo_checkpoint, tmp_path):
    root, _ = demo_checkpoint
    config = load_config(model={"backbone": "resnet18", "variant": "body_context"}, train=TINY)
    context_predictor = Predictor(build_model(config.model), config)  # untrained: shapes and wiring only
    csv_path = annotations_path(root, "test")
    out = tmp_path / "ctx.csv"
    summary = predict_csv(context_predictor, csv_path, out, img_dir=arrays_dir(root), batch_size=8, progress=False)
    result = pd.read_csv(out)
    assert len(result) == 11 and summary["variant"] == "body_context"
    assert np.isfinite(result[list(PROB_COLUMNS)].to_numpy()).all()

    paths_csv = tmp_path / "paths.csv"
    pd.DataFrame({"image_path": [str(arrays_dir(root) / "crop_arr_test_0.npy")]}).to_csv(paths_csv, index=False)
    with pytest.raises(ValueError, match="body_context model.*'context_path'"):
        predict_csv(context_predictor, paths_csv, tmp_path / "x.csv", progress=False)


def test_model_source_kinds(tmp_path):
    assert is_mlflow_uri("models:/emonet@champion") and is_mlflow_uri("runs:/abc/model")
    assert is_mlflow_uri("file:///tmp/model")
    assert not is_mlflow_uri(str(tmp_path / "best.pt")) and not is_mlflow_uri("C:/models/best.pt")
    (tmp_path / "logged").mkdir()
    (tmp_path / "logged" / "MLmodel").write_text("flavors: {}\n")
    assert is_mlflow_uri(tmp_path / "logged")
    assert set(ID_COLUMNS) >= {"Crop_name", "image_path"}


def test_retry_condition_skips_user_errors():
    from prefect.states import Failed

    from tasks.predict import retry_transient

    assert not retry_transient(None, None, Failed(data=ValueError("bad column")))
    assert not retry_transient(None, None, Failed(data=FileNotFoundError("missing.csv")))
    assert retry_transient(None, None, Failed(data=OSError("connection reset")))


@pytest.mark.slow
def test_registered_mlflow_model_scores_like_its_checkpoint(demo_checkpoint, predictor, tmp_path):
    import mlflow

    from emonet.tracking.run_logging import configure_mlflow, log_emonet_model

    root, checkpoint = demo_checkpoint
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        experiment_id = configure_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", "batch-tests")
        client = mlflow.MlflowClient()
        run_id = client.create_run(experiment_id).info.run_id
        version = log_emonet_model(run_id, checkpoint, registered_model_name="emonet-batch")
        client.set_registered_model_alias("emonet-batch", "champion", version.version)

        # The model carries the serving checkpoint: the weights and thresholds, no optimizer state.
        model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/emonet-batch/{version.version}"))
        (served,) = (model_dir / "artifacts").glob("*.pt")
        slim, full = read_checkpoint(served), read_checkpoint(checkpoint)
        assert slim["serving"] is True and not {"optimizer", "scheduler", "scaler", "rng"} & set(slim)
        assert served.stat().st_size < 0.6 * Path(checkpoint).stat().st_size
        assert all(torch.equal(slim["model"][key], full["model"][key]) for key in full["model"])

        loaded = load_predictor("models:/emonet-batch@champion", device="cpu", batch_size=3)
        assert isinstance(loaded, Predictor) and loaded.batch_size == 3
        np.testing.assert_allclose(loaded.thresholds, predictor.thresholds)
        out = tmp_path / "mlflow_predictions.csv"
        summary = predict_csv(
            "models:/emonet-batch@champion",
            annotations_path(root, "test"),
            out,
            img_dir=arrays_dir(root),
            progress=False,
        )
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    assert summary["model"] == "models:/emonet-batch@champion" and summary["rows_written"] == 11
    names = pd.read_csv(annotations_path(root, "test"))["Crop_name"]
    reference = _reference(predictor, root, names)
    np.testing.assert_allclose(pd.read_csv(out)[list(PROB_COLUMNS)], reference[list(PROB_COLUMNS)], atol=1e-5)


def test_batch_flow_validates_max_pixels():
    from prefect.exceptions import ParameterTypeError

    from flows.batch_predict import emonet_batch_predict

    base = {"input_csv": "crops.csv", "output_csv": "predictions.csv"}
    assert emonet_batch_predict.validate_parameters(base)["max_pixels"] == 40_000_000
    assert emonet_batch_predict.validate_parameters({**base, "max_pixels": 100})["max_pixels"] == 100
    with pytest.raises(ParameterTypeError):
        emonet_batch_predict.validate_parameters({**base, "max_pixels": 0})
