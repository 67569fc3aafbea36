"""Face visibility of body crops: the share of MediaPipe Face Mesh landmarks that lie
inside the crop, scored in parallel worker processes and added as a CSV column."""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from emonet.arrays import load_array
from emonet.schema import FACE_VISIBILITY_COLUMN

# Worker processes (the local pool's and Dask's) import this module to find the
# scoring functions, so its top level imports only numpy, tqdm and the torch- and
# pandas-free emonet.arrays and emonet.schema. Writing CSVs (pandas) and plotting
# (matplotlib) are imported inside the functions that run in the parent.

logger = logging.getLogger(__name__)

# The seed's Face Mesh settings. ``refine_landmarks=True`` adds the 10 iris landmarks,
# so the mesh returns 478 points, not 468: the score divides by the number returned.
FACE_MESH_OPTIONS: dict[str, Any] = {"static_image_mode": True, "max_num_faces": 1, "refine_landmarks": True}

# Size limits of a scored crop. Face Mesh works on a 192 x 192 resize of the face,
# so a crop with a longer side than MAX_SCORED_SIDE is subsampled (every k-th row and
# column) to at most that side before scoring: the score, a ratio of landmarks inside
# the crop, is kept, and only the rows used are read from a memory-mapped file. A crop
# of more than MAX_CROP_PIXELS is scored NaN without reading it: no body crop of a
# photo comes near (EMOTIC's largest photos have about 24 Mpx), and MediaPipe aborts
# the whole process on images whose byte count overflows OpenCV's 32-bit sizes.
MAX_SCORED_SIDE = 2048
MAX_CROP_PIXELS = 100_000_000

# Crop files smaller than this are read at once rather than memory-mapped (see
# emonet.arrays.load_array): Face Mesh copies every pixel anyway, and mapping a small
# file costs about as much as reading it twice.
_READ_AT_ONCE_BYTES = 4 << 20

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
    ValueError : ``crop`` is not a non-empty ``(H, W, 3)`` uint8 array, or has more
        than :data:`MAX_CROP_PIXELS` pixels. Crops with a side over
        :data:`MAX_SCORED_SIDE` are subsampled, not refused.

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
    result = face_mesh.process(_fit_for_face_mesh(crop))
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


def _fit_for_face_mesh(crop: np.ndarray) -> np.ndarray:
    """The crop within the size limits, C-contiguous, as MediaPipe needs it."""
    height, width = crop.shape[:2]
    if height * width > MAX_CROP_PIXELS:
        raise ValueError(
            f"crop of {height} x {width} px is over the limit of {MAX_CROP_PIXELS:,} px (MAX_CROP_PIXELS); not scored"
        )
    step = math.ceil(max(height, width) / MAX_SCORED_SIDE)
    if step > 1:
        crop = crop[::step, ::step]
    # MediaPipe refuses read-only arrays that are not C-contiguous ("Reference mode is
    # unavailable if 'data' is not c_contiguous"): Fortran-order .npy files map that
    # way. A C-contiguous memory map passes through without a copy.
    return np.ascontiguousarray(crop)


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
        crop = load_array(img_dir, name, mmap_min_bytes=_READ_AT_ONCE_BYTES)
        return scorer(crop), None
    except (OSError, ValueError) as err:
        return math.nan, str(err) or type(err).__name__


# One Face Mesh per thread (a graph must not be run by two threads at once), created
# on first use and kept for the life of the process: a pool worker or a Dask worker
# creates one and reuses it for every crop it is sent, and a process that scores
# shard after shard pays the start-up (0.2-0.5 s) once.
_thread_state = threading.local()


def thread_scorer() -> FaceVisibilityScorer:
    """This thread's Face Mesh, created on the first call and reused by later ones."""
    scorer = getattr(_thread_state, "scorer", None)
    if scorer is None:
        scorer = _thread_state.scorer = FaceVisibilityScorer()
    return scorer


def score_names(img_dir: str | Path, names: Sequence[str]) -> tuple[np.ndarray, dict[int, str]]:
    """Score crops in this process with :func:`thread_scorer`, without a progress bar.

    The unit of work sent to a pool worker: names go in, one float64 array and the
    failures come back, so the parent handles a chunk, not each crop.

    Returns
    -------
    tuple
        Scores, float64 of shape ``(len(names),)`` (NaN where unreadable), and
        ``{position in names: reason}`` for the unreadable crops.
    """
    scorer = thread_scorer()
    scores = np.empty(len(names), dtype=np.float64)
    failures: dict[int, str] = {}
    for index, name in enumerate(names):
        scores[index], reason = _score_file(scorer, img_dir, name)
        if reason is not None:
            failures[index] = reason
    return scores, failures


def _pool_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing start method for the scoring pool.

    Not 'fork': a child forked from a process that has run a Face Mesh corrupts its
    heap (glibc aborts with "malloc(): unaligned tcache chunk detected", seen with
    mediapipe 0.10.21), and the parent is often multi-threaded (Prefect task runners,
    MLflow, torch's OpenMP pool), where fork can deadlock on a lock held by another
    thread. 'forkserver' forks workers from a small server process that has run
    neither: it starts once per parent process and is reused by later pools. Each
    worker imports this module, numpy and mediapipe (not torch, see the imports
    above), and also the parent's ``__main__`` module, as every start method but
    'fork' does: that is why pools are kept for later calls (``_idle_pools``). Where
    forkserver does not exist (Windows) 'spawn' gives the same isolation.
    """
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def default_workers() -> int:
    """The number of CPU cores this process may run on (at least 1)."""
    # sched_getaffinity honours taskset and container cpusets; cpu_count does not.
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def chunk_size(n_crops: int, workers: int) -> int:
    """Crops per unit of work sent to a worker.

    Up to 32 crops (0.06-0.3 s of work) make the per-chunk cost of sending names and
    scores negligible, and at least 4 chunks per worker keep the workers evenly busy
    to the end on small inputs.
    """
    return max(1, min(32, n_crops // (4 * workers)))


def score_crops(
    img_dir: str | Path,
    crop_names: Sequence[str],
    workers: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Face visibility of many crops, in parallel, in input order.

    Each worker process creates one Face Mesh and reuses it, and the pool is kept
    for the next call of this process (:func:`shutdown_pools` stops it). Workers are
    sent chunks of crop names, not pixels, read the crops themselves and send back one
    array of scores per chunk, so memory does not grow with the number of crops and
    the parent does little work per crop. Workers are started with 'forkserver' (see
    ``_pool_context``), so a script that calls this with ``workers > 1`` needs the
    usual ``if __name__ == "__main__":`` guard.

    Parameters
    ----------
    img_dir : folder holding the ``.npy`` crops.
    crop_names : file names of the crops in ``img_dir`` (e.g. the CSV's ``Crop_name``).
    workers : number of worker processes; ``None`` uses every available core. With 1
        (or a single crop) the crops are scored in this process, without a pool, by
        this thread's Face Mesh (:func:`thread_scorer`, kept for later calls).
    progress : show a tqdm progress bar.

    Returns
    -------
    np.ndarray
        float64, shape ``(len(crop_names),)``: scores in [0, 100], NaN where the crop
        is missing, unreadable, a link out of ``img_dir`` or over
        :data:`MAX_CROP_PIXELS` (logged with the file name and the reason; their
        count is ``np.isnan(result).sum()``).

    Raises
    ------
    FileNotFoundError : ``img_dir`` is not a folder.
    ValueError : ``workers`` is less than 1.
    RuntimeError : a worker process died (killed, out of memory, a crash in native
        code); the other workers are stopped and no scores are returned.
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

    def record_failure(index: int, reason: str) -> None:
        nonlocal failures
        failures += 1
        if failures <= _MAX_LOGGED_FAILURES:
            logger.warning("%s: face visibility set to NaN: %s", names[index], reason)
        else:
            if failures == _MAX_LOGGED_FAILURES + 1:
                logger.warning("more unreadable crops: logged at DEBUG level from now on, counted at the end")
            logger.debug("%s: face visibility set to NaN: %s", names[index], reason)

    with tqdm(total=n, desc="face visibility", unit="crop", disable=not progress) as bar:
        if workers == 1:
            scorer = thread_scorer()
            for index, name in enumerate(names):
                scores[index], reason = _score_file(scorer, img_dir, name)
                if reason is not None:
                    record_failure(index, reason)
                bar.update()
        else:
            _score_in_pool(img_dir, names, workers, scores, record_failure, bar)
    if failures:
        logger.warning("%d of %d crops could not be read; their face visibility is NaN", failures, n)
    return scores


# Pools left idle by finished calls, by worker count, for the next call of this process.
# Starting a pool costs seconds, not the 0.5 s of Face Mesh: each worker re-imports the
# program's ``__main__`` module (multiprocessing does so for every start method but
# 'fork'), and for the training flow that is torch, Prefect and MLflow, about 6 s per
# pool on 2 cores. A flow that scores shard after shard pays it once.
_idle_pools: dict[int, list[ProcessPoolExecutor]] = {}
_idle_pools_lock = threading.Lock()


def _take_pool(workers: int) -> ProcessPoolExecutor:
    """An idle pool of ``workers`` processes, or a new one; concurrent callers get different pools."""
    with _idle_pools_lock:
        idle = _idle_pools.get(workers)
        if idle:
            return idle.pop()
    return ProcessPoolExecutor(workers, mp_context=_pool_context())


def shutdown_pools() -> None:
    """Stop the idle worker processes that :func:`score_crops` keeps for later calls.

    Optional: a process that scores nothing more may call it to free their memory
    early; ``concurrent.futures`` stops them at interpreter exit anyway.
    """
    with _idle_pools_lock:
        pools = [pool for idle in _idle_pools.values() for pool in idle]
        _idle_pools.clear()
    for pool in pools:
        pool.shutdown(wait=True)


def _score_in_pool(
    img_dir: Path,
    names: list[str],
    workers: int,
    scores: np.ndarray,
    record_failure: Callable[[int, str], None],
    bar: tqdm,
) -> None:
    """Fill ``scores`` from a pool of ``workers`` processes, chunk by chunk.

    ``concurrent.futures`` rather than ``multiprocessing.Pool``: when a worker dies
    (SIGKILL, out of memory, an abort in MediaPipe's native code) the executor fails
    every pending chunk with ``BrokenProcessPool``, where a ``Pool`` waits for ever
    for the lost results. The pool is kept for the next call when every chunk came
    back, and stopped otherwise.
    """
    size = chunk_size(len(names), workers)
    executor = _take_pool(workers)
    try:
        chunks = {
            executor.submit(score_names, str(img_dir), names[start : start + size]): start
            for start in range(0, len(names), size)
        }
        for future in as_completed(chunks):
            start = chunks[future]
            try:
                chunk_scores, chunk_failures = future.result()
            except BrokenProcessPool as err:
                raise RuntimeError(
                    f"a face-visibility worker process died (killed, out of memory or a crash in native code) "
                    f"while scoring {len(names)} crops of {img_dir}; the other workers were stopped and no "
                    f"scores were returned"
                ) from err
            scores[start : start + len(chunk_scores)] = chunk_scores
            for offset, reason in chunk_failures.items():
                record_failure(start + offset, reason)
            bar.update(len(chunk_scores))
    except BaseException:
        # Pending chunks are dropped at once on an error or Ctrl-C; the running ones
        # end within one chunk.
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    with _idle_pools_lock:
        _idle_pools.setdefault(workers, []).append(executor)


@dataclasses.dataclass(frozen=True)
class VisibilityResult:
    """Summary of :func:`add_face_visibility`.

    Attributes
    ----------
    out_csv : the CSV written (input columns plus ``Face_Visibility``).
    plot_path : the histogram PNG, or None.
    rows : rows in the output (every valid row; rows with invalid VAD are kept, their affect masked).
    scored : rows with a score (crop read).
    failed : rows whose crop was missing or unreadable (score NaN).
    with_face : rows with a face found (score > 0).
    full : rows with the whole face inside the crop (score == 100).
    mean : mean score over scored rows (NaN if none).
    rejected_rows : input rows dropped by ``load_annotations`` (only with ``invalid_affect="drop"``).
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

    def counts(self) -> dict[str, int | float]:
        """The counts and the mean alone, e.g. for MLflow metrics."""
        return {
            "rows": self.rows,
            "scored": self.scored,
            "failed": self.failed,
            "with_face": self.with_face,
            "full": self.full,
            "mean": self.mean,
        }

    def as_dict(self) -> dict[str, Any]:
        """Plain types (paths as strings), for JSON, MLflow or Prefect artifacts."""
        summary = dataclasses.asdict(self)
        summary["out_csv"] = str(self.out_csv)
        summary["plot_path"] = None if self.plot_path is None else str(self.plot_path)
        return summary


def write_visibility_csv(
    annotations_csv: str | Path, scores: Sequence[float] | np.ndarray, out_csv: str | Path
) -> VisibilityResult:
    """Write a copy of a split's CSV with ``Face_Visibility`` set to ``scores``.

    The CSV is read as it is, without validation: ``scores`` holds one value per data
    row in file order, as :func:`score_crops` returns for its ``Crop_name`` column
    (the flow scores shards of rows this way and validates rows later). The input is
    never modified; the copy keeps every column and is written atomically.

    Returns
    -------
    VisibilityResult
        Counts and mean of ``scores`` (``plot_path`` None, ``rejected_rows`` 0).

    Raises
    ------
    ValueError : ``out_csv`` is the input CSV (same path, a link or a hard link), or
        the number of scores differs from the number of rows.
    """
    from emonet.io import check_not_inputs, read_csv

    annotations_csv, out_csv = Path(annotations_csv), Path(out_csv)
    check_not_inputs({"out_csv": out_csv}, {"annotations_csv": annotations_csv})
    df = read_csv(annotations_csv)
    values = np.asarray(scores, dtype=np.float64)
    if values.shape != (len(df),):
        raise ValueError(f"{annotations_csv}: {values.size} face-visibility scores for {len(df)} rows")
    return _write_scored(df, values, annotations_csv, out_csv)


def _write_scored(df: Any, scores: np.ndarray, annotations_csv: Path, out_csv: Path) -> VisibilityResult:
    """Add (or replace) the ``Face_Visibility`` column, write ``df`` and summarize."""
    from emonet.io import write_csv_atomic

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
        failed=len(scores) - len(scored),
        with_face=int(np.count_nonzero(scored > 0)),
        full=int(np.count_nonzero(scored == 100.0)),
        mean=float(scored.mean()) if len(scored) else math.nan,
        rejected_rows=int(df.attrs.get("rejected_rows", 0)),
    )
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
        read with :func:`emonet.annotations.load_annotations`.
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
    # Imported here, not at the top: worker processes import this module and need
    # neither pandas nor matplotlib.
    from emonet.annotations import load_annotations
    from emonet.io import check_not_inputs
    from emonet.plots import plot_visibility_histogram

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
    result = _write_scored(df, scores, annotations_csv, out_csv)
    if plot_path is not None:
        title = f"Face visibility: {annotations_csv.name}"
        result = dataclasses.replace(result, plot_path=plot_visibility_histogram(scores, plot_path, title=title))
    return result


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
