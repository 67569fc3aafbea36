"""Property-based fuzzing of the input boundary: mutated ``.npy`` files, CSVs and PNG/JPEG
bytes raise only the documented exceptions (``ValueError``, its subclasses, or
``FileNotFoundError``), never an unexpected type that would abort a whole run.

Bounded and seeded (``derandomize``), so the quick suite stays quick and repeatable.
"""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pandas as pd
import pytest
from conftest import write_fake_archive
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from emonet.data.annotations import load_annotations
from emonet.data.arrays import load_array
from emonet.data.images import decode_image_b64, read_image
from emonet.schema import annotations_path

FUZZ = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DOCUMENTED = (ValueError, FileNotFoundError)


def _npy_bytes(shape=(8, 6, 3), dtype=np.uint8, fortran=False) -> bytes:
    buffer = io.BytesIO()
    array = np.arange(int(np.prod(shape)), dtype=np.int64).astype(dtype).reshape(shape)
    np.save(buffer, np.asfortranarray(array) if fortran else array)
    return buffer.getvalue()


VALID_NPY = _npy_bytes()
HEADER_END = VALID_NPY.index(b"\n") + 1  # the header dict ends with a newline, then pixels


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    mutated = bytearray(data)
    for position, value in edits:
        mutated[position % len(mutated)] = value
    return bytes(mutated[:cut] if cut is not None else mutated)


def _check_image_or_documented_error(read) -> None:
    try:
        array = read()
    except DOCUMENTED:
        return
    assert array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8 and min(array.shape) > 0
    np.asarray(array).sum()  # every pixel the header promised is there to read


# A header's shape as a malicious or broken writer might put it.
SHAPES = st.one_of(
    st.tuples(st.integers(-3, 10), st.integers(-3, 10), st.integers(-1, 4)),
    st.tuples(st.booleans(), st.integers(1, 8), st.just(3)),
    st.tuples(st.floats(allow_nan=True), st.integers(1, 8), st.just(3)),
    st.lists(st.integers(0, 5), max_size=5).map(tuple),
    st.just((10**12, 10**12, 3)),
    st.text(st.characters(max_codepoint=255), max_size=6),
)


def _with_header(header_dict: str, header_len_delta: int = 0) -> bytes:
    """A version 1.0 .npy whose header text is ``header_dict`` (length field off by ``header_len_delta``)."""
    text = (header_dict + " " * 16 + "\n").encode("latin1")
    length = (len(text) + header_len_delta) % 65536
    return b"\x93NUMPY\x01\x00" + length.to_bytes(2, "little") + text + VALID_NPY[HEADER_END:]


@pytest.mark.parametrize("mmap_min_bytes", [0, 1 << 20], ids=["mapped", "read-at-once"])
@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, HEADER_END + 16), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, len(VALID_NPY))),
)
def test_mutated_npy_bytes_raise_only_documented_errors(tmp_path, mmap_min_bytes, edits, cut):
    (tmp_path / "crop.npy").write_bytes(_mutate(VALID_NPY, edits, cut))
    _check_image_or_documented_error(lambda: load_array(tmp_path, "crop.npy", mmap_min_bytes=mmap_min_bytes))
    _check_image_or_documented_error(lambda: read_image(tmp_path / "crop.npy"))


@pytest.mark.parametrize("mmap_min_bytes", [0, 1 << 20], ids=["mapped", "read-at-once"])
@FUZZ
@given(
    shape=SHAPES,
    descr=st.sampled_from(["|u1", "<u2", "<f4", "|b1", "|O", "<U3", "bogus", "[('a', '|u1')]"]),
    fortran=st.sampled_from(["False", "True", "1", "None"]),
    header_len_delta=st.sampled_from([0, 0, 0, 1, -1, 40, -20, 1000]),
)
def test_npy_headers_of_any_shape_and_dtype_raise_only_documented_errors(
    tmp_path, mmap_min_bytes, shape, descr, fortran, header_len_delta
):
    descr_text = descr if descr.startswith("[") else repr(descr)
    header = f"{{'descr': {descr_text}, 'fortran_order': {fortran}, 'shape': {shape!r}, }}"
    (tmp_path / "crop.npy").write_bytes(_with_header(header, header_len_delta))
    _check_image_or_documented_error(lambda: load_array(tmp_path, "crop.npy", mmap_min_bytes=mmap_min_bytes))
    _check_image_or_documented_error(lambda: read_image(tmp_path / "crop.npy"))


@pytest.mark.parametrize(
    "shape, message",
    [
        ("(True, 64, 3)", r"crop\.npy: expected an H x W x 3 image, got shape \(True, 64, 3\)"),
        ("(-1, 64, 3)", r"crop\.npy: expected an H x W x 3 image, got shape \(-1, 64, 3\)"),
    ],
    ids=["boolean", "negative"],
)
@pytest.mark.parametrize("mmap_min_bytes", [0, 1 << 20], ids=["mapped", "read-at-once"])
def test_the_headers_a_fuzzer_found_are_named_errors(tmp_path, shape, message, mmap_min_bytes):
    (tmp_path / "crop.npy").write_bytes(_with_header(f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}"))
    with pytest.raises(ValueError, match=message):
        load_array(tmp_path, "crop.npy", mmap_min_bytes=mmap_min_bytes)


def test_a_header_length_beyond_the_header_is_a_named_error(tmp_path):
    # The length field claims more bytes than the header has: NumPy's tokenizer used to escape.
    (tmp_path / "crop.npy").write_bytes(_with_header("{'descr': '|u1', 'fortran_order': False, 'shape': (8, 6", 200))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "crop.npy"))):
        load_array(tmp_path, "crop.npy", mmap_min_bytes=1 << 20)


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(8 * 6 * 3, dtype=np.uint8).reshape(8, 6, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(8 * 6 * 3, dtype=np.uint8).reshape(8, 6, 3)).save(buffer, format="JPEG")
    return buffer.getvalue()


PICTURES = {"png": _png_bytes(), "jpg": _jpeg_bytes()}


@pytest.mark.parametrize("kind", sorted(PICTURES))
@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 400)),
)
def test_mutated_png_and_jpeg_bytes_raise_only_documented_errors(tmp_path, kind, edits, cut):
    data = _mutate(PICTURES[kind], edits, cut)
    (tmp_path / f"picture.{kind}").write_bytes(data)
    _check_image_or_documented_error(lambda: read_image(tmp_path / f"picture.{kind}"))
    _check_image_or_documented_error(lambda: decode_image_b64(base64.b64encode(data).decode("ascii")))


@pytest.fixture(scope="module")
def valid_csv(tmp_path_factory) -> bytes:
    root = write_fake_archive(tmp_path_factory.mktemp("fuzz-archive"))
    return annotations_path(root, "train").read_bytes()


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 4000), st.sampled_from(b',\n"\x00x-9.eE ')), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 4000)),
)
def test_mutated_csvs_raise_only_documented_errors(tmp_path, valid_csv, edits, cut):
    (tmp_path / "annot_arrs_train.csv").write_bytes(_mutate(valid_csv, edits, cut))
    try:
        frame = load_annotations(tmp_path / "annot_arrs_train.csv")
    except DOCUMENTED:
        return
    assert isinstance(frame, pd.DataFrame) and len(frame) > 0
