"""Inference: image decoding, Predictor outputs and the MLflow pyfunc wrapper (in process)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from emonet.config import load_config
from emonet.data.images import decode_image_b64, read_image
from emonet.data.normalize import AffectNormalizer
from emonet.inference.predictor import OUTPUT_COLUMNS, PROB_COLUMNS, Predictor
from emonet.models.network import build_model
from emonet.schema import EMOTIONS, NUM_EMOTIONS

IMAGE_SIZE = 32


def _png_bytes(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def _crops(rng: np.random.Generator, shapes=((40, 40), (50, 30), (40, 40), (25, 70), (40, 40))) -> list[np.ndarray]:
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in shapes]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint["checkpoint"]


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    return Predictor.from_checkpoint(checkpoint, batch_size=2)


# --------------------------------------------------------------------------- decoding


def test_read_image_npy_png_jpg(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", image)
    (tmp_path / "a.png").write_bytes(_png_bytes(image))
    smooth = np.repeat(np.linspace(0, 255, 30, dtype=np.uint8)[None, :, None], 20, axis=0).repeat(3, axis=2)
    (tmp_path / "a.JPG").write_bytes(_png_bytes(smooth, "JPEG"))

    np.testing.assert_array_equal(read_image(tmp_path / "a.npy"), image)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), image)
    jpg = read_image(str(tmp_path / "a.JPG"))  # suffix case does not matter
    assert jpg.shape == (20, 30, 3) and jpg.dtype == np.uint8
    assert np.abs(jpg.astype(int) - smooth).mean() < 3  # lossy, but the same picture


def test_read_image_converts_gray_and_rgba_to_rgb(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    (tmp_path / "g.png").write_bytes(_png_bytes(gray))
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    (tmp_path / "rgba.png").write_bytes(_png_bytes(rgba))

    out = read_image(tmp_path / "g.png")
    assert out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out[..., 0], gray)
    np.testing.assert_array_equal(out[..., 1], gray)
    assert read_image(tmp_path / "rgba.png")[0, 0].tolist() == [200, 0, 0]


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="image file not found: .*missing.png"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="unsupported image file type '.gif'"):
        read_image(tmp_path / "x.gif")
    np.save(tmp_path / "gray.npy", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"gray.npy: expected an H x W x 3 image, got shape \(4, 4\)"):
        read_image(tmp_path / "gray.npy")
    np.save(tmp_path / "float.npy", np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="expected dtype uint8, got float32"):
        read_image(tmp_path / "float.npy")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png: cannot decode"):
        read_image(tmp_path / "broken.png")


def test_decode_image_b64_roundtrip_and_errors():
    image = np.random.default_rng(1).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    text = base64.b64encode(_png_bytes(image)).decode()
    np.testing.assert_array_equal(decode_image_b64(text), image)
    np.testing.assert_array_equal(decode_image_b64("data:image/png;base64," + text), image)
    with pytest.raises(ValueError, match="invalid base64"):
        decode_image_b64("not base64 !!")
    with pytest.raises(ValueError, match="cannot decode as a PNG/JPEG"):
        decode_image_b64(base64.b64encode(b"plain text, not an image").decode())
    with pytest.raises(ValueError, match="non-empty base64 string"):
        decode_image_b64(None)


# --------------------------------------------------------------------------- predictor


def test_predict_frame_columns_ranges_and_thresholds(predictor, checkpoint):
    from emonet.models.checkpoint import load_checkpoint

    _, _, raw = load_checkpoint(checkpoint)
    np.testing.assert_allclose(predictor.thresholds, raw["thresholds"])  # tuned on val, not 0.5
    assert predictor.image_size == IMAGE_SIZE and not predictor.needs_context

    frame = predictor.predict_frame(_crops(np.random.default_rng(2)))
    assert list(frame.columns) == list(OUTPUT_COLUMNS)
    assert list(frame.columns[:NUM_EMOTIONS]) == [f"prob_{e}" for e in EMOTIONS]  # paper order
    assert len(frame) == 5
    probs = frame[list(PROB_COLUMNS)].to_numpy()
    assert np.all((probs >= 0) & (probs <= 1))
    affect = frame[["valence", "arousal"]].to_numpy()
    assert np.all((affect >= -1) & (affect <= 1))
    np.testing.assert_allclose(
        frame[["valence_1_10", "arousal_1_10"]].to_numpy(), AffectNormalizer().inverse_transform(affect)
    )
    for row, names in zip(probs, frame["emotions"]):
        expected = [e for e, p, t in zip(EMOTIONS, row, predictor.thresholds) if p >= t]
        assert names == ";".join(expected)


def test_to_frame_emotions_in_paper_order_with_inclusive_thresholds(predictor):
    thresholds = np.full(NUM_EMOTIONS, 0.5)
    thresholds[EMOTIONS.index("Suffering")] = 0.9
    custom = Predictor(predictor.model, predictor.config, thresholds=thresholds)
    probs = np.zeros((3, NUM_EMOTIONS))
    probs[0, [EMOTIONS.index("Fear"), EMOTIONS.index("Peace")]] = [0.7, 0.5]  # 0.5 == threshold counts
    probs[1, EMOTIONS.index("Suffering")] = 0.8  # above 0.5 but below its own 0.9
    probs[2, EMOTIONS.index("Doubt/Confusion")] = 1.0
    frame = custom.to_frame(probs, np.zeros((3, 2)))
    assert frame["emotions"].tolist() == ["Peace;Fear", "", "Doubt/Confusion"]
    assert frame[["valence_1_10", "arousal_1_10"]].to_numpy().tolist() == [[5.5, 5.5]] * 3


def test_fitted_normalizer_from_json(checkpoint, tmp_path):
    normalizer = AffectNormalizer(low=(2.0, 3.0), high=(8.0, 9.0), method="fit_on_train")
    path = normalizer.save(tmp_path / "normalization.json")
    frame = Predictor.from_checkpoint(checkpoint, normalizer=path).predict_frame(_crops(np.random.default_rng(3)))
    affect = frame[["valence", "arousal"]].to_numpy()
    scaled = frame[["valence_1_10", "arousal_1_10"]].to_numpy()
    np.testing.assert_allclose(scaled, normalizer.inverse_transform(affect))
    assert np.all((scaled[:, 0] >= 2) & (scaled[:, 0] <= 8) & (scaled[:, 1] >= 3) & (scaled[:, 1] <= 9))
    with pytest.raises(FileNotFoundError, match="normalization file not found"):
        Predictor.from_checkpoint(checkpoint, normalizer=tmp_path / "nope.json")


def test_inputs_apply_the_eval_transform_to_each_row(predictor):
    crops = _crops(np.random.default_rng(4), shapes=((40, 40), (90, 61), (17, 33)))
    inputs = predictor.inputs(lambda row: (crops[row], None), len(crops))
    for row, crop in enumerate(crops):
        item = inputs[row]
        assert set(item) == {"body", "index"} and item["index"] == row
        assert item["body"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        torch.testing.assert_close(item["body"], predictor.transform(torch.from_numpy(crop).permute(2, 0, 1)))


def test_predictions_do_not_depend_on_batch_size(predictor):
    crops = _crops(np.random.default_rng(5))
    probs_2, affect_2 = predictor.predict_proba(crops)  # batch_size 2: three batches
    probs_all, affect_all = Predictor(predictor.model, predictor.config, batch_size=64).predict_proba(crops)
    np.testing.assert_allclose(probs_2, probs_all, atol=1e-5)
    np.testing.assert_allclose(affect_2, affect_all, atol=1e-5)
    assert probs_2.dtype == np.float32 and probs_2.shape == (5, NUM_EMOTIONS)


def test_bad_crop_names_its_row_across_batches(predictor):
    crops = _crops(np.random.default_rng(6))
    crops[3] = crops[3].astype(np.float32)  # row 3 sits in the second batch of 2
    with pytest.raises(ValueError, match="row 3: crop: expected dtype uint8"):
        predictor.predict_frame(crops)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        Predictor(predictor.model, predictor.config, batch_size=0)
    with pytest.raises(ValueError, match="thresholds must be 26 finite floats"):
        Predictor(predictor.model, predictor.config, thresholds=[0.5] * 3)


def test_body_context_model_needs_contexts():
    config = load_config(
        model={"backbone": "resnet18", "variant": "body_context"},
        train={"image_size": IMAGE_SIZE, "context_size": 48},
    )
    predictor = Predictor(build_model(config.model), config)
    crops = _crops(np.random.default_rng(7))
    with pytest.raises(ValueError, match="body_context model: pass contexts"):
        predictor.predict_proba(crops)
    with pytest.raises(ValueError, match="got 5 crops but 4 contexts"):
        predictor.predict_proba(crops, crops[:4])
    item = predictor.inputs(lambda row: (crops[row], crops[::-1][row]), len(crops))[1]
    assert item["body"].shape == (3, IMAGE_SIZE, IMAGE_SIZE) and item["context"].shape == (3, 48, 48)
    frame = predictor.predict_frame(crops, crops[::-1])
    assert list(frame.columns) == list(OUTPUT_COLUMNS) and len(frame) == 5


# --------------------------------------------------------------------------- pyfunc (in process)


@pytest.fixture(scope="module")
def pyfunc(checkpoint, tmp_path_factory):
    from emonet.inference.pyfunc_model import EmoNetPyfunc

    normalization = AffectNormalizer().save(tmp_path_factory.mktemp("norm") / "normalization.json")
    model = EmoNetPyfunc()
    context = SimpleNamespace(
        artifacts={"checkpoint": str(checkpoint), "normalization": str(normalization)},
        model_config={"inference_batch_size": 2, "inference_device": "cpu"},
    )
    model.load_context(context)
    assert model.predictor.batch_size == 2  # so four rows span two batches
    return model


def test_pyfunc_predicts_paths_and_base64_like_the_predictor(pyfunc, predictor, tmp_path):
    images = _crops(np.random.default_rng(8))
    np.save(tmp_path / "0.npy", images[0])
    (tmp_path / "1.png").write_bytes(_png_bytes(images[1]))
    np.save(tmp_path / "3.npy", images[3])
    table = pd.DataFrame(
        {
            "image_path": [str(tmp_path / "0.npy"), str(tmp_path / "1.png"), None, str(tmp_path / "3.npy"), np.nan],
            "image_b64": [
                None,
                None,
                base64.b64encode(_png_bytes(images[2])).decode(),
                None,
                base64.b64encode(_png_bytes(images[4])).decode(),
            ],
        }
    )
    out = pyfunc.predict(None, table)
    assert list(out.columns) == list(OUTPUT_COLUMNS) and len(out) == 5
    expected = predictor.predict_frame(images)
    pd.testing.assert_frame_equal(out, expected, atol=1e-5)

    only_b64 = pyfunc.predict(None, pd.DataFrame({"image_b64": table["image_b64"].dropna().tolist()}))
    pd.testing.assert_frame_equal(only_b64, expected.iloc[[2, 4]].reset_index(drop=True), atol=1e-5)
    empty = pyfunc.predict(None, pd.DataFrame({"image_path": pd.Series([], dtype=object)}))
    assert list(empty.columns) == list(OUTPUT_COLUMNS) and len(empty) == 0


def test_pyfunc_bad_rows_name_the_row(pyfunc, tmp_path):
    from emonet.inference.pyfunc_model import InvalidModelInput

    image = np.zeros((8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "ok.npy", image)
    ok = str(tmp_path / "ok.npy")
    missing = str(tmp_path / "gone.png")
    with pytest.raises(ValueError, match=f"row 3: image file not found: {missing}"):
        pyfunc.predict(None, pd.DataFrame({"image_path": [ok, ok, ok, missing]}))
    with pytest.raises(ValueError, match="row 1: invalid base64"):
        pyfunc.predict(None, pd.DataFrame({"image_b64": [base64.b64encode(_png_bytes(image)).decode(), "%%%"]}))
    with pytest.raises(ValueError, match="row 0: no image given: image_path or image_b64 is empty"):
        pyfunc.predict(None, pd.DataFrame({"image_path": [None, ok], "image_b64": [None, None]}))
    with pytest.raises(InvalidModelInput, match="needs a 'image_path' or 'image_b64' column"):
        pyfunc.predict(None, pd.DataFrame({"path": [ok]}))


def test_pyfunc_body_context_reads_context_columns(tmp_path):
    from emonet.inference.pyfunc_model import EmoNetPyfunc, InvalidModelInput

    config = load_config(
        model={"backbone": "resnet18", "variant": "body_context"}, train={"image_size": IMAGE_SIZE, "context_size": 48}
    )
    model = EmoNetPyfunc()
    model.predictor = Predictor(build_model(config.model), config, batch_size=4)  # one batch: one set of shapes
    images = _crops(np.random.default_rng(9))[:3]
    for i, image in enumerate(images):
        np.save(tmp_path / f"{i}.npy", image)
    crops = [str(tmp_path / f"{i}.npy") for i in range(3)]
    with pytest.raises(InvalidModelInput, match="'context_path' or 'context_b64' column"):
        model.predict(None, pd.DataFrame({"image_path": crops}))
    scenes = [base64.b64encode(_png_bytes(image)).decode() for image in images[::-1]]
    out = model.predict(None, pd.DataFrame({"image_path": crops, "context_b64": scenes}))
    expected = model.predictor.predict_frame(images, images[::-1])
    pd.testing.assert_frame_equal(out, expected, atol=1e-5)
    with pytest.raises(ValueError, match="row 2: no context image given: context_b64 is empty"):
        model.predict(None, pd.DataFrame({"image_path": crops, "context_b64": scenes[:2] + [""]}))
