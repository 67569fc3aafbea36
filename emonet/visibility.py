"""Face visibility of body crops: the share of MediaPipe Face Mesh landmarks that lie
inside the crop, scored in parallel worker processes and added as a CSV column."""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from emonet.arrays import load_array
from emonet.schema import FACE_VISIBILITY_COLUMN

# This module is imported by every worker process (to find the worker functions), so
# it imports only numpy, tqdm and emonet.schema at the top. ``emonet.data`` imports
# torch (about 3 s on 2 cores) and ``emonet.io`` pandas: both are imported inside the
# functions that run in the parent, never in a worker.

logger = logging.getLogger(__name__)

# The seed's Face Mesh settings. ``refine_landmarks=True`` adds the 10 iris landmarks,
# so the mesh returns 478 points, not 468: the score divides by the number returned.
FACE_MESH_OPTIONS: dict[str, Any] = {"static_image_mode": True, "max_num_faces": 1, "refine_landmarks": True}

# Unreadable crops are logged as warnings up to this many, then at DEBUG level, so a
# wrong image folder does not bury the log under 23k identical warnings.
_MAX_LOGGED_FAILURES = 20


def face_visibility_score(crop: np.ndarray, face_mesh: Any) -> float:
    """Percentage of Face Mesh landmarks that lie inside the crop.

    Parameters
    ----------
    crop : RGB uint8 image, shape ``(H, W, 3)`` (a memory map is fine).
    face_mesh : a ``mediapipe.solutions.face_mesh.FaceMesh`` (or anything with the
        same ``process`` method), created with :data:`FACE_MESH_OPTIONS`.

    Returns
    -------
    float
        ``100 * inside / returned``, where ``inside`` counts landmarks whose normalized
        x and y both lie in [0, 1]. Face Mesh extrapolates the landmarks of a face cut
        by the border to outside [0, 1], so a partly visible face scores strictly
        between 0 and 100. 0.0 when no face is found. Never above 100.

    Raises
    ------
    ValueError : ``crop`` is not an ``(H, W, 3)`` uint8 array.

    Examples
    --------
    >>> with FaceVisibilityScorer() as scorer:  # doctest: +SKIP
    ...     face_visibility_score(np.zeros((64, 64, 3), np.uint8), scorer.face_mesh)
    0.0
    """
    if not isinstance(crop, np.ndarray) or crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
        shape = getattr(crop, "shape", None)
        dtype = getattr(crop, "dtype", type(crop).__name__)
        raise ValueError(f"expected an RGB uint8 crop of shape (H, W, 3), got shape {shape} dtype {dtype}")
    if crop.shape[0] == 0 or crop.shape[1] == 0:
        raise ValueError(f"expected a non-empty crop, got shape {crop.shape}")
    # MediaPipe copies the pixels into its own image frame, so strided views and
    # memory-mapped crops are passed as they are.
    result = face_mesh.process(crop)
    faces = result.multi_face_landmarks
    if not faces:
        return 0.0
    landmarks = faces[0].landmark
    if len(landmarks) == 0:
        return 0.0
    xy = np.fromiter((c for point in landmarks for c in (point.x, point.y)), dtype=np.float64, count=2 * len(landmarks))
    xy = xy.reshape(-1, 2)  # (L, 2) normalized x, y
    inside = np.count_nonzero(np.all((xy >= 0.0) & (xy <= 1.0), axis=1))
    return 100.0 * inside / len(xy)


class FaceVisibilityScorer:
    """One MediaPipe Face Mesh, created once and reused for many crops.

    Creating a Face Mesh loads its models and starts a calculator graph, so a loop
    over crops should keep one. Use as a context manager to release the graph.

    Examples
    --------
    >>> with FaceVisibilityScorer() as scorer:  # doctest: +SKIP
    ...     scores = [scorer(crop) for crop in crops]
    """

    def __init__(self) -> None:
        # Imported here: mediapipe takes about 1 s to import (it pulls in cv2 and
        # matplotlib), which a process that never scores should not pay.
        import mediapipe as mp

        self.face_mesh = mp.solutions.face_mesh.FaceMesh(**FACE_MESH_OPTIONS)

    def __call__(self, crop: np.ndarray) -> float:
        """Face visibility of one crop in [0, 100]; see :func:`face_visibility_score`."""
        if self.face_mesh is None:
            raise ValueError("this FaceVisibilityScorer is closed")
        return face_visibility_score(crop, self.face_mesh)

    def close(self) -> None:
        """Release the Face Mesh graph; calling it twice is harmless."""
        if self.face_mesh is not None:
            self.face_mesh.close()
            self.face_mesh = None

    def __enter__(self) -> FaceVisibilityScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _score_file(scorer: FaceVisibilityScorer, img_dir: str | Path, name: str) -> tuple[float, str | None]:
    """Score one crop file: ``(score, None)``, or ``(nan, reason)`` if it cannot be read."""
    try:
        crop = load_array(img_dir, name)
        return scorer(crop), None
    except (OSError, ValueError) as err:
        return math.nan, str(err) or type(err).__name__


# Per-process state of a pool worker: one Face Mesh, created by the initializer and
# reused for every crop the worker is sent. No thread cap is needed: Face Mesh runs
# single-threaded on CPU (measured 1.0 CPU-second per wall-second), so N workers use
# N cores.
_worker_scorer: FaceVisibilityScorer | None = None
_worker_img_dir: str | None = None
_worker_error: str | None = None


def _init_worker(img_dir: str) -> None:
    global _worker_scorer, _worker_img_dir, _worker_error
    _worker_img_dir = img_dir
    try:
        _worker_scorer = FaceVisibilityScorer()
    except Exception as err:  # noqa: BLE001 - re-raised by every task, see below
        # A Pool whose initializer raises replaces the dead worker forever and the
        # parent hangs; failing each task instead sends the error to the parent.
        _worker_error = f"{type(err).__name__}: {err}"


def _score_in_worker(name: str) -> tuple[float, str | None]:
    if _worker_scorer is None or _worker_img_dir is None:
        raise RuntimeError(f"could not create a Face Mesh in worker process {os.getpid()}: {_worker_error}")
    return _score_file(_worker_scorer, _worker_img_dir, name)


def _pool_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing start method for the scoring pool.

    Not 'fork': a child forked from a process that has run a Face Mesh corrupts its
    heap (glibc aborts with "malloc(): unaligned tcache chunk detected", seen with
    mediapipe 0.10.21), and the parent is often multi-threaded (Prefect task runners,
    MLflow, torch's OpenMP pool), where fork can deadlock on a lock held by another
    thread. 'forkserver' forks workers from a small server process that has run
    neither: it starts once per parent process and is reused by later pools. The
    server imports the parent's ``__main__`` module (keep entry points' top-level
    imports light) and each worker adds only this module, numpy and mediapipe (not
    torch, see the imports above). Where forkserver does not exist (Windows) 'spawn'
    gives the same isolation.
    """
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def default_workers() -> int:
    """The number of CPU cores this process may run on (at least 1)."""
    # sched_getaffinity honours taskset and container cpusets; cpu_count does not.
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def score_crops(
    img_dir: str | Path,
    crop_names: Sequence[str],
    workers: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Face visibility of many crops, in parallel, in input order.

    Each worker process creates one Face Mesh and reuses it. Workers are sent crop
    names, not pixels, and read the crops themselves, so memory does not grow with
    the number of crops. Workers are started with 'forkserver' (see
    ``_pool_context``), so a script that calls this with ``workers > 1`` needs the
    usual ``if __name__ == "__main__":`` guard.

    Parameters
    ----------
    img_dir : folder holding the ``.npy`` crops.
    crop_names : file names of the crops in ``img_dir`` (e.g. the CSV's ``Crop_name``).
    workers : number of worker processes; ``None`` uses every available core. With 1
        (or a single crop) the crops are scored in this process, without a pool.
    progress : show a tqdm progress bar.

    Returns
    -------
    np.ndarray
        float64, shape ``(len(crop_names),)``: scores in [0, 100], NaN where the crop
        is missing or unreadable (logged with the file name and the reason; their
        count is ``np.isnan(result).sum()``).

    Raises
    ------
    FileNotFoundError : ``img_dir`` is not a folder.
    ValueError : ``workers`` is less than 1.
    """
    img_dir = Path(img_dir)
    if not img_dir.is_dir():
        raise FileNotFoundError(f"image array folder not found: {img_dir}")
    if workers is None:
        workers = default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    names = list(crop_names)  # strings only: a few MB for the largest split
    n = len(names)
    scores = np.full(n, np.nan, dtype=np.float64)
    workers = min(workers, max(n, 1))
    failures = 0

    def record(index: int, score: float, reason: str | None) -> None:
        nonlocal failures
        scores[index] = score
        if reason is not None:
            failures += 1
            if failures <= _MAX_LOGGED_FAILURES:
                logger.warning("%s: face visibility set to NaN: %s", names[index], reason)
            else:
                if failures == _MAX_LOGGED_FAILURES + 1:
                    logger.warning("more unreadable crops: logged at DEBUG level from now on, counted at the end")
                logger.debug("%s: face visibility set to NaN: %s", names[index], reason)

    with tqdm(total=n, desc="face visibility", unit="crop", disable=not progress) as bar:
        if workers == 1:
            with FaceVisibilityScorer() as scorer:
                for index, name in enumerate(names):
                    record(index, *_score_file(scorer, img_dir, name))
                    bar.update()
        else:
            # Chunks of ~32 crops (~0.1 s of work) make the per-task pickling cost
            # negligible; small inputs get smaller chunks so all workers get some.
            chunksize = max(1, min(32, n // (4 * workers)))
            with _pool_context().Pool(workers, initializer=_init_worker, initargs=(str(img_dir),)) as pool:
                for index, (score, reason) in enumerate(pool.imap(_score_in_worker, names, chunksize=chunksize)):
                    record(index, score, reason)
                    bar.update()
    if failures:
        logger.warning("%d of %d crops could not be read; their face visibility is NaN", failures, n)
    return scores


@dataclasses.dataclass(frozen=True)
class VisibilityResult:
    """Summary of :func:`add_face_visibility`.

    Attributes
    ----------
    out_csv : the CSV written (input columns plus ``Face_Visibility``).
    plot_path : the histogram PNG, or None.
    rows : rows in the output (rows ``load_annotations`` rejected are not in it).
    scored : rows with a score (crop read).
    failed : rows whose crop was missing or unreadable (score NaN).
    with_face : rows with a face found (score > 0).
    full : rows with the whole face inside the crop (score == 100).
    mean : mean score over scored rows (NaN if none).
    rejected_rows : input rows dropped by ``load_annotations`` (invalid VAD).
    """

    out_csv: Path
    plot_path: Path | None
    rows: int
    scored: int
    failed: int
    with_face: int
    full: int
    mean: float
    rejected_rows: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain types (paths as strings), for JSON, MLflow or Prefect artifacts."""
        summary = dataclasses.asdict(self)
        summary["out_csv"] = str(self.out_csv)
        summary["plot_path"] = None if self.plot_path is None else str(self.plot_path)
        return summary


def add_face_visibility(
    annotations_csv: str | Path,
    img_dir: str | Path,
    out_csv: str | Path,
    workers: int | None = None,
    plot_path: str | Path | None = None,
    progress: bool = True,
) -> VisibilityResult:
    """Write a copy of an annotation CSV with a ``Face_Visibility`` column.

    The input CSV is never modified. Rows keep their order and every input column;
    ``Face_Visibility`` is appended (or replaced, if the input already has it).

    Parameters
    ----------
    annotations_csv : an ``annot_arrs_<split>.csv`` (or a CSV derived from one),
        read with :func:`emonet.data.load_annotations`.
    img_dir : folder with the ``.npy`` arrays named in ``Crop_name``.
    out_csv : where to write the copy (atomically).
    workers : worker processes for :func:`score_crops`; ``None`` for all cores.
    plot_path : if given, also save a histogram of the scores there (PNG).
    progress : show a progress bar.

    Returns
    -------
    VisibilityResult
        Counts (rows, scored, failed, with a face, full) and the mean score.

    Raises
    ------
    FileNotFoundError : the CSV or the image folder does not exist.
    ValueError : ``out_csv`` or ``plot_path`` is the input CSV, ``out_csv`` is
        ``plot_path``, the CSV is invalid (see ``load_annotations``), or no crop at
        all could be read (most likely a wrong ``img_dir``).
    """
    # Imported here, not at the top: emonet.data imports torch and emonet.io pandas,
    # and worker processes import this module.
    from emonet.annotations import load_annotations
    from emonet.io import check_not_inputs, write_csv_atomic

    annotations_csv, img_dir, out_csv = Path(annotations_csv), Path(img_dir), Path(out_csv)
    plot_path = None if plot_path is None else Path(plot_path)
    check_not_inputs({"out_csv": out_csv, "plot_path": plot_path}, {"annotations_csv": annotations_csv})
    if not img_dir.is_dir():
        raise FileNotFoundError(f"image array folder not found: {img_dir}")

    df = load_annotations(annotations_csv)
    scores = score_crops(img_dir, df["Crop_name"].tolist(), workers=workers, progress=progress)
    failed = int(np.isnan(scores).sum())
    if failed == len(scores):
        raise ValueError(
            f"none of the {failed} crops named in {annotations_csv.name} could be read from {img_dir} "
            "(see the warnings above); nothing written"
        )
    if FACE_VISIBILITY_COLUMN in df.columns:
        logger.info("%s already has %s; replacing it", annotations_csv.name, FACE_VISIBILITY_COLUMN)
    df[FACE_VISIBILITY_COLUMN] = scores
    write_csv_atomic(df, out_csv)

    scored = scores[~np.isnan(scores)]
    result = VisibilityResult(
        out_csv=out_csv,
        plot_path=None,
        rows=len(scores),
        scored=len(scored),
        failed=failed,
        with_face=int(np.count_nonzero(scored > 0)),
        full=int(np.count_nonzero(scored == 100.0)),
        mean=float(scored.mean()),
        rejected_rows=int(df.attrs.get("rejected_rows", 0)),
    )
    if plot_path is not None:
        title = f"Face visibility: {annotations_csv.name}"
        result = dataclasses.replace(result, plot_path=plot_visibility_histogram(scores, plot_path, title=title))
    logger.info(
        "face visibility of %d rows written to %s: %d with a face (%d whole), %d unreadable (NaN), mean %.1f",
        result.rows,
        out_csv,
        result.with_face,
        result.full,
        result.failed,
        result.mean,
    )
    return result


def plot_visibility_histogram(scores: np.ndarray | Sequence[float], path: str | Path, title: str | None = None) -> Path:
    """Save a histogram of face-visibility scores as a PNG.

    Bins are 5 points wide over [0, 100]; the counts of unreadable (NaN), no-face
    (0) and whole-face (100) crops are shown in a text box, since on real crops the
    score is nearly binary and those two bars dominate.

    Parameters
    ----------
    scores : scores in [0, 100], NaN for unreadable crops.
    path : the PNG to write (atomically).
    title : figure title; a default one if None.

    Returns
    -------
    Path
        ``path``.
    """
    # A bare Figure renders with the Agg canvas without touching pyplot's global
    # backend, so this works headless and from worker threads.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from emonet.io import save_figure_atomic

    values = np.asarray(scores, dtype=np.float64).ravel()
    nan_count = int(np.isnan(values).sum())
    valid = values[~np.isnan(values)]
    zero_count = int(np.count_nonzero(valid == 0.0))
    full_count = int(np.count_nonzero(valid == 100.0))
    partial_count = len(valid) - zero_count - full_count

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ax.hist(valid, bins=np.linspace(0.0, 100.0, 21), color="tab:blue", edgecolor="white")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0, 100)
    ax.set_xlabel("Face visibility (% of Face Mesh landmarks inside the crop)")
    ax.set_ylabel("Crops")
    ax.set_title(title if title is not None else "Face visibility of body crops")
    ax.grid(axis="y", alpha=0.3)
    summary = (
        f"crops: {len(values)}\n"
        f"no face (0): {zero_count}\n"
        f"partial (0-100): {partial_count}\n"
        f"whole face (100): {full_count}\n"
        f"unreadable (NaN): {nan_count}"
    )
    ax.text(
        0.5,
        0.97,
        summary,
        transform=ax.transAxes,
        ha="center",
        va="top",
        fontsize=9,
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85},
    )
    return save_figure_atomic(fig, path)


# Windows (rows, columns) of skimage's 512 x 512 astronaut photo, whose face spans
# columns 179-271 and rows 71-177. "partial" cuts the left ~30% of the face off:
# Face Mesh still finds it and extrapolates the cut landmarks past the border, giving
# 78-92 at every size from 96 to 512 px (checked with mediapipe 0.10.21).
_EXAMPLE_WINDOWS: dict[str, tuple[slice, slice]] = {
    "whole": (slice(20, 420), slice(110, 340)),
    "partial": (slice(20, 420), slice(205, 405)),
    "none": (slice(250, 512), slice(0, 230)),
}


def example_crop(kind: str = "whole", size: int | None = None) -> np.ndarray:
    """A body-like crop of a real photo (``skimage.data.astronaut()``) with a known face.

    For tests, benchmarks and demos: ``"whole"`` holds the whole face (score 100),
    ``"partial"`` a face cut by the left border (score strictly between 0 and 100),
    ``"none"`` the lower body and flag, without a face (score 0).

    Parameters
    ----------
    kind : ``"whole"``, ``"partial"`` or ``"none"``.
    size : if given, the crop is resized to ``size`` x ``size``, as the archive's
        crops are; otherwise it keeps its native size (about 400 x 230).

    Returns
    -------
    np.ndarray
        RGB uint8, shape ``(H, W, 3)``.
    """
    if kind not in _EXAMPLE_WINDOWS:
        raise ValueError(f"kind must be one of {sorted(_EXAMPLE_WINDOWS)}, got {kind!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive integer or None, got {size!r}")
    from skimage import data, transform

    rows, cols = _EXAMPLE_WINDOWS[kind]
    crop = data.astronaut()[rows, cols]
    if size is None:
        return np.ascontiguousarray(crop)
    resized = transform.resize(crop, (size, size), anti_aliasing=True)  # float in [0, 1]
    return np.clip(np.round(resized * 255.0), 0, 255).astype(np.uint8)
