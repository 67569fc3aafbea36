"""Hostile images: the pixel limit checked before decoding, and file paths confined to an
image root (in process and as MLflow's scoring server sees them)."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from emonet.data.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_REQUEST_PIXELS,
    DEFAULT_MAX_ROWS,
    ImageTooLargeError,
    decode_image_b64,
    read_confined_image,
    read_image,
    resolve_image_root,
)
from emonet.data.normalize import AffectNormalizer

SERVING_FLAG = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"


def _png_bytes(image: np.ndarray | Image.Image) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sparse_npy(path: Path, shape: tuple[int, ...]) -> Path:
    """A real ``.npy`` declaring ``shape`` (uint8) that takes a few KB on disk: open_memmap
    writes the header and only the last byte, the rest is a hole."""
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()
    assert os.stat(path).st_blocks * 512 < 1 << 20  # sparse: under 1 MB really on disk
    return path


def forbid_decoding(monkeypatch) -> None:
    """Fail the test if any pixel of a PNG/JPEG is decoded from now on."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    # ImageFile.load decodes files; Image.load is the base class's.
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(Image.Image, "load", refuse)


# --------------------------------------------------------------------------- pixel limit


def test_png_bomb_is_refused_from_its_header(monkeypatch):
    # The reproduction: 13000 x 13000 pixels in about 20 KB, 507 MB once decoded as RGB.
    bomb = _png_bytes(Image.new("1", (13000, 13000)))
    assert len(bomb) < 100_000
    forbid_decoding(monkeypatch)
    with pytest.raises(
        ImageTooLargeError,
        match=r"base64 image: image of 13000 x 13000 = 169,000,000 pixels is over "
        r"the limit of 40,000,000",
    ):
        decode_image_b64(_b64(bomb))


def test_pixel_limit_on_files_and_base64_is_inclusive(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    (tmp_path / "a.png").write_bytes(_png_bytes(image))
    np.save(tmp_path / "a.npy", image)
    for path in (tmp_path / "a.png", tmp_path / "a.npy"):
        np.testing.assert_array_equal(read_image(path, max_pixels=600), image)  # exactly at the limit
        with pytest.raises(ImageTooLargeError, match=f"{path.name}: image of 30 x 20 = 600 pixels .* limit of 599"):
            read_image(path, max_pixels=599)
        assert read_image(path, max_pixels=None).shape == (20, 30, 3)
    np.testing.assert_array_equal(decode_image_b64(_b64(_png_bytes(image)), max_pixels=600), image)
    with pytest.raises(ImageTooLargeError, match="limit of 599"):
        decode_image_b64(_b64(_png_bytes(image)), max_pixels=599)
    for bad in (0, -1, 2.5, "100", True):
        with pytest.raises(ValueError, match="max_pixels must be a positive int or None"):
            read_image(tmp_path / "a.png", max_pixels=bad)


def test_only_png_and_jpeg_are_decoded(tmp_path):
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    for fmt in ("BMP", "TIFF", "GIF"):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format=fmt)
        with pytest.raises(ValueError, match="base64 image: cannot decode as a PNG/JPEG image"):
            decode_image_b64(_b64(buffer.getvalue()))
        (tmp_path / "disguised.png").write_bytes(buffer.getvalue())
        with pytest.raises(ValueError, match="disguised.png: cannot decode as a PNG/JPEG image"):
            read_image(tmp_path / "disguised.png")


def test_oversize_npy_header_is_refused_without_reading_pixels(tmp_path):
    path = sparse_npy(tmp_path / "huge.npy", (100_000, 100_000, 3))  # declares 30 GB
    with pytest.raises(ImageTooLargeError, match=r"huge.npy: image of 100000 x 100000 = 10,000,000,000 pixels"):
        read_image(path)
    assert DEFAULT_MAX_PIXELS == 40_000_000


# --------------------------------------------------------------------------- confinement


@pytest.fixture
def tree(tmp_path):
    """An image root with one crop, a symlink leading out of it, and an image outside it."""
    image = np.random.default_rng(1).integers(0, 256, size=(8, 6, 3), dtype=np.uint8)
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    np.save(root / "sub" / "in.npy", image)
    (root / "broken.png").write_bytes(b"\x89PNG not an image")
    outside = tmp_path / "secret.npy"
    np.save(outside, image)
    (root / "escape.npy").symlink_to(outside)
    (root / "alias.npy").symlink_to(root / "sub" / "in.npy")
    return SimpleNamespace(root=resolve_image_root(root), image=image, outside=outside)


def test_confined_reads_inside_the_root(tree):
    for given in ("sub/in.npy", str(tree.root / "sub" / "in.npy"), "sub/../sub/in.npy", "alias.npy"):
        np.testing.assert_array_equal(read_confined_image(given, tree.root), tree.image)


def test_confined_refuses_outside_dotdot_and_escaping_symlinks_with_one_message(tree):
    refused = {
        "outside": str(tree.outside),
        "dotdot": "../secret.npy",
        "dotdot inside": "sub/../../secret.npy",
        "symlink": "escape.npy",
        "missing": "sub/gone.npy",
        "missing outside": "/no/such/file.npy",
        "undecodable": "broken.png",
        "not an image type": "/etc/passwd",
        "a folder": "sub",
    }
    messages = {}
    for case, given in refused.items():
        with pytest.raises(ValueError) as info:
            read_confined_image(given, tree.root)
        assert not isinstance(info.value, ImageTooLargeError)
        messages[case] = str(info.value).replace(repr(given), "<path>")
    # One message for all: a client learns nothing about which files exist.
    assert set(messages.values()) == {"<path> is not a readable image file under the image root"}


def test_confined_over_the_limit_is_named(tree):
    sparse_npy(tree.root / "big.npy", (10_000, 10_000, 3))
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        read_confined_image("big.npy", tree.root)


def test_image_root_must_be_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="image root is not a folder"):
        resolve_image_root(tmp_path / "missing")


# --------------------------------------------------------------------------- pyfunc


def _load_pyfunc(checkpoint: Path, tmp_path: Path, **model_config):
    from emonet.inference.pyfunc_model import EmoNetPyfunc

    model = EmoNetPyfunc()
    normalization = AffectNormalizer().save(tmp_path / "normalization.json")
    context = SimpleNamespace(
        artifacts={"checkpoint": str(checkpoint), "normalization": str(normalization)},
        model_config={"inference_batch_size": 2, "inference_device": "cpu", **model_config},
    )
    model.load_context(context)
    return model


@pytest.fixture
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint["checkpoint"]


def test_pyfunc_refuses_rows_over_the_pixel_limit_naming_the_row(checkpoint, tmp_path, monkeypatch):
    from emonet.inference.pyfunc_model import InvalidModelInput

    monkeypatch.delenv("EMONET_IMAGE_ROOT", raising=False)
    small = np.zeros((10, 10, 3), dtype=np.uint8)
    big = np.zeros((10, 11, 3), dtype=np.uint8)
    np.save(tmp_path / "big.npy", big)
    model = _load_pyfunc(checkpoint, tmp_path, inference_max_pixels=100)
    assert len(model.predict(None, pd.DataFrame({"image_b64": [_b64(_png_bytes(small))] * 3}))) == 3
    with pytest.raises(InvalidModelInput, match="row 2: base64 image: image of 11 x 10 = 110 pixels"):
        model.predict(None, pd.DataFrame({"image_b64": [_b64(_png_bytes(small))] * 2 + [_b64(_png_bytes(big))]}))
    with pytest.raises(InvalidModelInput, match="row 1: .*big.npy: image of 11 x 10"):
        model.predict(
            None,
            pd.DataFrame(
                {"image_path": [None, str(tmp_path / "big.npy")], "image_b64": [_b64(_png_bytes(small)), None]}
            ),
        )
    # The default, when the logged model_config has no such key: 40 Mpx.
    assert _load_pyfunc(checkpoint, tmp_path).max_pixels == DEFAULT_MAX_PIXELS


def test_pyfunc_bounds_a_request_by_rows_and_total_pixels_before_decoding(checkpoint, tmp_path, monkeypatch):
    from emonet.inference.pyfunc_model import InvalidModelInput

    image = _b64(_png_bytes(np.zeros((20, 30, 3), dtype=np.uint8)))  # 600 pixels
    np.save(tmp_path / "a.npy", np.zeros((20, 30, 3), dtype=np.uint8))
    model = _load_pyfunc(checkpoint, tmp_path, inference_max_rows=3, inference_max_request_pixels=1500)
    assert len(model.predict(None, pd.DataFrame({"image_b64": [image] * 2}))) == 2
    forbid_decoding(monkeypatch)
    with pytest.raises(InvalidModelInput, match="4 rows in one request is over the limit of 3 rows per request"):
        model.predict(None, pd.DataFrame({"image_b64": [image] * 4}))
    with pytest.raises(
        InvalidModelInput, match=r"rows 0-2 hold 1,800 pixels, over the limit of 1,500 pixels per request"
    ):
        model.predict(
            None, pd.DataFrame({"image_path": [None, None, str(tmp_path / "a.npy")], "image_b64": [image, image, None]})
        )
    # The defaults, when the logged model_config has no such keys.
    default = _load_pyfunc(checkpoint, tmp_path)
    assert (
        (default.max_rows, default.max_request_pixels)
        == (DEFAULT_MAX_ROWS, DEFAULT_MAX_REQUEST_PIXELS)
        == (256, 200_000_000)
    )
    with pytest.raises(ValueError, match="inference_max_rows must be a positive int"):
        _load_pyfunc(checkpoint, tmp_path, inference_max_rows=0)


def test_pyfunc_confines_paths_to_the_image_root(checkpoint, tree, tmp_path, monkeypatch):
    from emonet.inference.pyfunc_model import InvalidModelInput

    monkeypatch.delenv("EMONET_IMAGE_ROOT", raising=False)
    model = _load_pyfunc(checkpoint, tmp_path, inference_image_root=str(tree.root))
    inside = model.predict(None, pd.DataFrame({"image_path": ["sub/in.npy", str(tree.root / "alias.npy")]}))
    expected = model.predictor.predict_frame([tree.image, tree.image])
    pd.testing.assert_frame_equal(inside, expected, atol=1e-5)
    messages = []
    for given in (str(tree.outside), "../secret.npy", "escape.npy", "sub/gone.npy", "broken.png"):
        with pytest.raises(
            InvalidModelInput, match=r"row 1: .* is not a readable image file under the image root"
        ) as info:
            model.predict(None, pd.DataFrame({"image_path": ["sub/in.npy", given]}))
        messages.append(str(info.value).replace(repr(given), "<path>"))
    assert len(set(messages)) == 1

    # The environment variable sets the root when the model config does not.
    monkeypatch.setenv("EMONET_IMAGE_ROOT", str(tree.root))
    from_env = _load_pyfunc(checkpoint, tmp_path)
    assert from_env.image_root == tree.root
    with pytest.raises(InvalidModelInput, match="not a readable image file under the image root"):
        from_env.predict(None, pd.DataFrame({"image_path": [str(tree.outside)]}))
    monkeypatch.setenv("EMONET_IMAGE_ROOT", str(tmp_path / "no_such_root"))
    with pytest.raises(FileNotFoundError, match="image root is not a folder"):
        _load_pyfunc(checkpoint, tmp_path)


def test_scoring_server_without_a_root_accepts_only_base64(checkpoint, tree, tmp_path, monkeypatch):
    from emonet.inference.pyfunc_model import InvalidModelInput

    monkeypatch.delenv("EMONET_IMAGE_ROOT", raising=False)
    monkeypatch.delenv(SERVING_FLAG, raising=False)
    model = _load_pyfunc(checkpoint, tmp_path)
    rows = pd.DataFrame({"image_path": [str(tree.root / "sub" / "in.npy")]})
    assert len(model.predict(None, rows)) == 1  # in process: the caller reads its own files

    monkeypatch.setenv(SERVING_FLAG, "true")  # what mlflow.pyfunc.scoring_server.init() sets
    for path in (str(tree.root / "sub" / "in.npy"), "/etc/passwd", "../../etc/shadow", "/no/such.png"):
        with pytest.raises(InvalidModelInput, match="row 0: file paths are refused by the scoring server") as info:
            model.predict(None, pd.DataFrame({"image_path": [path]}))
        assert info.value.get_http_status_code() == 400
    assert len(model.predict(None, pd.DataFrame({"image_b64": [_b64(_png_bytes(tree.image))]}))) == 1
    # With a root, the server reads files under it.
    rooted = _load_pyfunc(checkpoint, tmp_path, inference_image_root=str(tree.root))
    assert len(rooted.predict(None, pd.DataFrame({"image_path": ["sub/in.npy"]}))) == 1


def test_mlflow_scoring_server_sets_the_flag_the_model_reads(monkeypatch):
    # The flag is MLflow's private name: this fails if an MLflow upgrade stops setting it,
    # instead of REST clients silently reading files again.
    from mlflow.pyfunc import scoring_server

    from emonet.inference.pyfunc_model import _in_scoring_server

    monkeypatch.setenv(SERVING_FLAG, "false")  # restored (removed) after the test
    assert not _in_scoring_server()
    fake_model = SimpleNamespace(metadata=SimpleNamespace(get_input_schema=lambda: None))
    scoring_server.init(fake_model)
    assert os.environ[SERVING_FLAG] == "true" and _in_scoring_server()


def test_scoring_server_app_answers_400_to_file_paths_and_bombs(checkpoint, tmp_path, monkeypatch):
    # MLflow's own scoring app (what `mlflow models serve` runs under uvicorn), in process.
    import mlflow
    from mlflow.pyfunc import scoring_server
    from starlette.testclient import TestClient

    from emonet.tracking.run_logging import PYFUNC_MODEL_FILE, model_signature

    monkeypatch.delenv("EMONET_IMAGE_ROOT", raising=False)
    monkeypatch.setenv(SERVING_FLAG, "false")  # init() sets it; removed again after the test
    normalization = AffectNormalizer().save(tmp_path / "normalization.json")
    model_dir = tmp_path / "model"
    mlflow.pyfunc.save_model(
        model_dir,
        python_model=str(PYFUNC_MODEL_FILE),
        artifacts={"checkpoint": str(checkpoint), "normalization": str(normalization)},
        signature=model_signature(uses_context=False),
        pip_requirements=[],
        model_config={"inference_batch_size": 2, "inference_device": "cpu"},
    )
    client = TestClient(scoring_server.init(mlflow.pyfunc.load_model(str(model_dir))))

    def post(record: dict) -> tuple[int, str]:
        response = client.post("/invocations", json={"dataframe_records": [record]})
        return response.status_code, response.text

    crop = np.zeros((12, 12, 3), dtype=np.uint8)
    np.save(tmp_path / "crop.npy", crop)
    status, text = post({"image_b64": _b64(_png_bytes(crop))})
    assert status == 200 and "predictions" in text
    answers = [post({"image_path": path}) for path in ("/etc/passwd", "../../etc/passwd", str(tmp_path / "crop.npy"))]
    assert {status for status, _ in answers} == {400}
    assert all("row 0: file paths are refused by the scoring server" in text for _, text in answers)
    status, text = post({"image_b64": _b64(_png_bytes(Image.new("1", (13000, 13000))))})
    assert status == 400 and "row 0: base64 image: image of 13000 x 13000" in text
