"""Batch inference over a CSV of body crops with a checkpoint or an MLflow model, streamed
chunk by chunk into a predictions CSV so memory stays flat in the number of rows."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from emonet.data.arrays import load_array
from emonet.data.images import DEFAULT_MAX_PIXELS, check_max_pixels, check_pixel_limit, read_image
from emonet.data.normalize import AffectNormalizer
from emonet.inference.loading import ModelSource, describe_model, load_predictor
from emonet.inference.predictor import OUTPUT_COLUMNS, Predictor
from emonet.utils.io import atomic_path, check_not_inputs, ensure_writable_dir, read_csv

logger = logging.getLogger(__name__)

__all__ = [
    "CONTEXT_PATH",
    "CsvImageReader",
    "ID_COLUMNS",
    "IMAGE_PATH",
    "ON_ERROR_OPTIONS",
    "ROW_COLUMN",
    "predict_csv",
    "skipped_path",
]

# Input columns of the "paths" layout (the same names as the MLflow model's input).
IMAGE_PATH = "image_path"
CONTEXT_PATH = "context_path"
# Input columns of the archive layout (file names inside ``img_dir``).
CROP_NAME = "Crop_name"
ARR_NAME = "Arr_name"
# Input columns copied to the output, when present, so predictions can be joined back.
ID_COLUMNS: tuple[str, ...] = ("Filename", CROP_NAME, ARR_NAME, IMAGE_PATH, CONTEXT_PATH)
# The 0-based data row of the input CSV (header excluded); the first output column.
ROW_COLUMN = "row"
ON_ERROR_OPTIONS: tuple[str, ...] = ("raise", "skip")
# Reasons kept in the returned summary; the full list goes to the skipped-rows CSV.
_SUMMARY_SKIPPED = 20


# --------------------------------------------------------------------------- input rows


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


class CsvImageReader:
    """Reads the crop (and full image) of one input row, in either input layout: an
    ``image_path`` column (relative paths from ``img_dir``, else the CSV's folder) or the
    archive's ``Crop_name`` (and ``Arr_name``) with ``img_dir``. :meth:`read` takes the
    row as a dict."""

    def __init__(
        self,
        columns: Sequence[str],
        csv_path: Path,
        img_dir: Path | None,
        needs_context: bool,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.img_dir = img_dir
        self.columns = list(columns)
        self.needs_context = needs_context
        self.max_pixels = max_pixels
        if IMAGE_PATH in columns:
            self.layout = "paths"
            self.image_column, self.context_column = IMAGE_PATH, CONTEXT_PATH
            # Relative paths follow the CSV (or img_dir), not the caller's working folder,
            # so a CSV shipped beside its images works from anywhere.
            self.base = img_dir if img_dir is not None else csv_path.parent
        elif CROP_NAME in columns:
            if img_dir is None:
                raise ValueError(f"{csv_path.name} names crops in {CROP_NAME!r}: pass img_dir (the img_arrs folder)")
            self.layout = "archive"
            self.image_column, self.context_column = CROP_NAME, ARR_NAME
            self.base = img_dir
        else:
            raise ValueError(
                f"{csv_path.name} needs an {IMAGE_PATH!r} column (image files) or a {CROP_NAME!r} column "
                f"(the archive's crops, with img_dir); got columns {list(columns)}"
            )
        if needs_context and self.context_column not in columns:
            raise ValueError(
                f"the model is a body_context model: {csv_path.name} needs a {self.context_column!r} column "
                f"(the full image of every crop) besides {self.image_column!r}"
            )

    def _read(self, value: object, column: str) -> np.ndarray:
        if _is_missing(value):
            raise ValueError(f"{column} is empty")
        if not isinstance(value, str):
            raise ValueError(f"{column} must be a string, got {value!r}")
        if self.layout == "archive":
            array = load_array(self.base, value)  # memory-mapped: only the header is read so far
            check_pixel_limit(array.shape[0], array.shape[1], self.max_pixels, value)
            return array
        return read_image(self._path(value), max_pixels=self.max_pixels)

    def _path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base / path

    def listed_files(self, csv_path: Path) -> Iterator[Path]:
        """Every image file the CSV names by path (none in the archive layout), read lazily."""
        if self.layout == "archive":
            return
        columns = [self.image_column] + ([self.context_column] if self.context_column in self.columns else [])
        for chunk in read_csv(csv_path, usecols=columns, dtype=str, chunksize=65536):
            for value in chunk.to_numpy().ravel():
                if isinstance(value, str) and value.strip():
                    yield self._path(value)

    def read(self, record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        crop = self._read(record.get(self.image_column), self.image_column)
        context = self._read(record.get(self.context_column), self.context_column) if self.needs_context else None
        return crop, context


def skipped_path(out_csv: str | Path) -> Path:
    """Where :func:`predict_csv` with ``on_error="skip"`` lists skipped rows: ``<out>.skipped.csv``."""
    out_csv = Path(out_csv)
    return out_csv.with_name(f"{out_csv.stem}.skipped.csv")


def _count_rows(csv_path: Path) -> int:
    # One narrow pass in chunks: cheap next to decoding images, and memory stays flat.
    return sum(len(chunk) for chunk in read_csv(csv_path, usecols=[0], chunksize=65536))


# --------------------------------------------------------------------------- predict_csv


def _check_inputs(
    model: ModelSource,
    csv_path: Path,
    out_csv: Path,
    img_dir: str | Path | None,
    batch_size: int,
    on_error: str,
    keep_columns: Sequence[str],
    max_pixels: int | None,
) -> tuple[list[str], Path | None, Path | None]:
    """Check the arguments and the input CSV before any model is loaded.

    Returns the CSV's columns, ``img_dir`` as a ``Path`` and the skipped-rows CSV
    (None with ``on_error="raise"``).
    """
    if on_error not in ON_ERROR_OPTIONS:
        raise ValueError(f"unknown on_error {on_error!r}; expected one of {list(ON_ERROR_OPTIONS)}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    check_max_pixels(max_pixels)
    if not csv_path.is_file():
        raise FileNotFoundError(f"input CSV not found: {csv_path}")
    skipped_csv = skipped_path(out_csv) if on_error == "skip" else None
    if out_csv.is_dir():
        raise ValueError(f"out_csv is a folder, expected a file path: {out_csv}")
    img_dir = Path(img_dir) if img_dir is not None else None
    if img_dir is not None and not img_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {img_dir}")
    try:
        columns = list(read_csv(csv_path, nrows=0).columns)
    except pd.errors.EmptyDataError:
        raise ValueError(f"input CSV is empty (no header): {csv_path}") from None
    # Fail on the layout before loading a model, which can take a while.
    layout = CsvImageReader(columns, csv_path, img_dir, needs_context=False)
    check_not_inputs(
        {"out_csv": out_csv, "skipped_csv": skipped_csv},
        {"input CSV": csv_path, "model": model},
        image_dir=img_dir,
        image_files=layout.listed_files(csv_path),
    )
    ensure_writable_dir(out_csv.parent)  # a read-only folder fails now, not after scoring
    missing = [column for column in keep_columns if column not in columns]
    if missing:
        raise ValueError(f"keep_columns not in {csv_path.name}: {missing}")
    clashing = [column for column in keep_columns if column in OUTPUT_COLUMNS or column == ROW_COLUMN]
    if clashing:
        raise ValueError(f"keep_columns would clash with prediction columns: {clashing}")
    return columns, img_dir, skipped_csv


def _read_chunk(
    chunk: pd.DataFrame,
    first_row: int,
    reader: CsvImageReader,
    id_columns: list[str],
    on_error: str,
    csv_path: Path,
) -> tuple[list[int], list[np.ndarray], list[np.ndarray | None], list[dict[str, Any]]]:
    """Decode a chunk's images: the offsets of the rows read, their crops and full images,
    and the skipped rows (with ``on_error="skip"``; ``"raise"`` stops at the first bad row)."""
    kept, crops, contexts, skipped = [], [], [], []
    for offset, record in enumerate(chunk.to_dict("records")):
        row = first_row + offset
        try:
            crop, context = reader.read(record)
        except (ValueError, FileNotFoundError) as error:
            if on_error == "raise":
                raise type(error)(f"{csv_path.name}: row {row}: {error}") from None
            skipped.append({ROW_COLUMN: row, **{c: record.get(c) for c in id_columns}, "reason": str(error)})
            continue
        kept.append(offset)
        crops.append(crop)
        contexts.append(context)
    return kept, crops, contexts, skipped


def _open_atomic_csv(stack: contextlib.ExitStack, path: Path, columns: list[str]) -> TextIO:
    """A handle on a temporary file renamed onto ``path`` when ``stack`` closes without
    error; the header row is written."""
    handle = stack.enter_context(open(stack.enter_context(atomic_path(path)), "w", newline="", encoding="utf-8"))
    pd.DataFrame(columns=columns).to_csv(handle, index=False)
    return handle


def _stream_predictions(
    predictor: Predictor,
    reader: CsvImageReader,
    csv_path: Path,
    out_csv: Path,
    skipped_csv: Path | None,
    id_columns: list[str],
    batch_size: int,
    on_error: str,
    progress: bool,
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Read, predict and append the input chunk by chunk; returns the row counts
    (``read``, ``written``, ``skipped``) and the first skipped rows."""
    out_columns = [ROW_COLUMN, *id_columns, *OUTPUT_COLUMNS]
    # Identifying columns are text: without this, pandas would turn "007" into 7.
    dtypes = {column: str for column in id_columns}
    total = _count_rows(csv_path) if progress else None
    counts = {"read": 0, "written": 0, "skipped": 0}
    first_skipped: list[dict[str, Any]] = []
    bar = tqdm(total=total, desc="predict", unit="row", disable=not progress, dynamic_ncols=True)
    # Both files appear only if every chunk succeeds; an error leaves neither behind. The
    # handles close before the renames: ExitStack unwinds in reverse order.
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        out_handle = _open_atomic_csv(stack, out_csv, out_columns)
        skip_handle = None
        if skipped_csv is not None:
            skip_handle = _open_atomic_csv(stack, skipped_csv, [ROW_COLUMN, *id_columns, "reason"])
        for chunk in read_csv(csv_path, chunksize=batch_size, dtype=dtypes):
            first_row = counts["read"]
            kept, crops, contexts, skipped = _read_chunk(chunk, first_row, reader, id_columns, on_error, csv_path)
            if kept:
                probs, affect = predictor.predict_proba(crops, contexts if predictor.needs_context else None)
                frame = predictor.to_frame(probs, affect)  # (len(kept), len(OUTPUT_COLUMNS))
                ids = chunk.iloc[kept][id_columns].reset_index(drop=True)
                ids.insert(0, ROW_COLUMN, [first_row + offset for offset in kept])
                pd.concat([ids, frame], axis=1)[out_columns].to_csv(out_handle, header=False, index=False)
            if skipped:
                pd.DataFrame(skipped).to_csv(skip_handle, header=False, index=False)
                first_skipped += [{"row": s[ROW_COLUMN], "reason": s["reason"]} for s in skipped]
                del first_skipped[_SUMMARY_SKIPPED:]
            counts["read"] += len(chunk)
            counts["written"] += len(kept)
            counts["skipped"] += len(skipped)
            bar.update(len(chunk))
    return counts, first_skipped


def _summarize(
    model: ModelSource,
    predictor: Predictor,
    reader: CsvImageReader,
    csv_path: Path,
    out_csv: Path,
    skipped_csv: Path | None,
    counts: dict[str, int],
    first_skipped: list[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    """The summary :func:`predict_csv` returns, with its log lines."""
    summary = {
        "input_csv": str(csv_path),
        "output_csv": str(out_csv),
        "model": describe_model(model),
        "variant": predictor.variant,
        "runtime": predictor.runtime,
        "layout": reader.layout,
        "rows_read": counts["read"],
        "rows_written": counts["written"],
        "rows_skipped": counts["skipped"],
        "skipped_csv": str(skipped_csv) if skipped_csv is not None else None,
        "skipped": first_skipped,
        "seconds": round(seconds, 3),
        "rows_per_second": round(counts["read"] / seconds, 2) if seconds > 0 else None,
    }
    if counts["skipped"]:
        logger.warning(
            "%s: skipped %d of %d rows; listed in %s", csv_path.name, counts["skipped"], counts["read"], skipped_csv
        )
    logger.info(
        "wrote %d predictions to %s (%.1f rows/s)",
        counts["written"],
        out_csv,
        counts["read"] / seconds if seconds > 0 else float("nan"),
    )
    return summary


def predict_csv(
    model: ModelSource,
    csv_path: str | Path,
    out_csv: str | Path,
    img_dir: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
    *,
    on_error: Literal["raise", "skip"] = "raise",
    device: str = "auto",
    normalizer: AffectNormalizer | str | Path | None = None,
    keep_columns: Sequence[str] = (),
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    runtime: str = "auto",
) -> dict[str, Any]:
    """Score every row of a CSV of body crops and write the predictions CSV.

    The input is read ``batch_size`` rows at a time (pandas ``chunksize``); each chunk
    is decoded, predicted and appended to a temporary file that is renamed onto
    ``out_csv`` at the end, so memory does not grow with the number of rows and an
    interrupted run leaves no partial output.

    Parameters
    ----------
    model : a checkpoint path, an MLflow model URI (``models:/emonet@champion``,
        ``runs:/...``) or a :class:`~emonet.inference.predictor.Predictor`; see
        :func:`load_predictor`.
    csv_path : the input CSV, in one of two layouts:

        - an ``image_path`` column: paths of ``.npy`` / ``.png`` / ``.jpg`` crops;
          relative paths are taken from ``img_dir`` if given, else from the CSV's
          folder. ``body_context`` models also need ``context_path`` (the full image).
        - the archive's ``Crop_name`` column (e.g. an ``annot_arrs_<split>.csv``) with
          ``img_dir`` the ``img_arrs`` folder; ``body_context`` models also read ``Arr_name``.

        ``image_path`` wins when both columns are present.
    out_csv : where to write; must differ from ``csv_path`` (the input is never
        overwritten). Columns: ``row`` (0-based data row of the input), the input's
        identifying columns that exist (``Filename``, ``Crop_name``, ``Arr_name``,
        ``image_path``, ``context_path``), ``keep_columns``, then
        :data:`emonet.inference.predictor.OUTPUT_COLUMNS` (``prob_<Emotion>`` x 26, ``emotions``,
        ``valence``, ``arousal``, ``valence_1_10``, ``arousal_1_10``).
    img_dir : folder of the crops (archive layout) or base of relative paths.
    batch_size : rows read, decoded and predicted at a time (and the forward-pass
        batch of a model loaded here).
    progress : show a tqdm bar over rows.
    on_error : what to do with a row whose image is missing or unreadable:
        ``"raise"`` (default) stops with an error naming the row; ``"skip"`` leaves the
        row out, and lists every skipped row (``row``, the identifying columns,
        ``reason``) in ``<out_csv stem>.skipped.csv`` beside ``out_csv`` (written, with
        only its header when nothing was skipped, so an old list never lingers).
    device : ``"auto"``, ``"cpu"`` or ``"cuda"`` for a model loaded here.
    normalizer : affect normalization for a checkpoint (see :func:`load_predictor`).
    keep_columns : more input columns to copy to the output (e.g. an id).
    max_pixels : a row whose image (or full image) has more pixels is a bad row
        (raised or skipped, see ``on_error``); checked from the file's header, before
        any pixel is read. None for no limit.
    runtime : ``"auto"`` (ONNX Runtime for a registered model with an ONNX export, on
        the CPU), ``"onnxruntime"`` or ``"torch"``, for a model loaded here (see
        :func:`load_predictor`).

    Returns
    -------
    dict
        ``input_csv``, ``output_csv``, ``model``, ``variant``, ``runtime``, ``layout`` (``"paths"``
        or ``"archive"``), ``rows_read``, ``rows_written``, ``rows_skipped``,
        ``skipped_csv`` (None with ``on_error="raise"``), ``skipped`` (the first 20
        ``{"row", "reason"}``), ``seconds`` and ``rows_per_second``.

    Raises
    ------
    FileNotFoundError
        The input CSV, ``img_dir`` or (with ``on_error="raise"``) an image is missing.
    ValueError
        ``out_csv`` is the input, an unknown ``on_error``, a bad ``batch_size`` or ``max_pixels``, an
        empty CSV, missing columns (named), or (with ``on_error="raise"``) an
        unreadable image; row errors name the 0-based data row.

    Examples
    --------
    >>> predict_csv("models:/emonet@champion", "crops.csv", "predictions.csv")  # doctest: +SKIP
    {'rows_read': 120, 'rows_written': 120, 'rows_skipped': 0, ...}
    """
    csv_path, out_csv = Path(csv_path), Path(out_csv)
    columns, img_dir, skipped_csv = _check_inputs(
        model, csv_path, out_csv, img_dir, batch_size, on_error, keep_columns, max_pixels
    )

    predictor = load_predictor(model, device=device, batch_size=batch_size, normalizer=normalizer, runtime=runtime)
    reader = CsvImageReader(columns, csv_path, img_dir, predictor.needs_context, max_pixels)
    id_columns = [c for c in ID_COLUMNS if c in columns] + [c for c in keep_columns if c not in ID_COLUMNS]
    started = time.perf_counter()
    counts, first_skipped = _stream_predictions(
        predictor, reader, csv_path, out_csv, skipped_csv, id_columns, batch_size, on_error, progress
    )
    seconds = time.perf_counter() - started
    return _summarize(model, predictor, reader, csv_path, out_csv, skipped_csv, counts, first_skipped, seconds)
