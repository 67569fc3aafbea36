"""Prefect tasks for the data half of the pipeline: demo data, face visibility, normalization."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from emonet.data.annotations import load_annotations
from emonet.data.demo import ensure_demo_archive
from emonet.data.face_visibility import score_crops
from emonet.data.normalize import AffectNormalizer, normalize_frames, write_normalized
from emonet.data.visibility_column import write_visibility_csv
from emonet.plots import plot_visibility_histogram
from tasks.caching import CSV_CONTENTS_CACHE, VISIBILITY_SHARD_CACHE

# File-system hiccups (network shares, a busy disk) are the plausible transient failures.
IO_RETRIES = {"retries": 2, "retry_delay_seconds": exponential_backoff(backoff_factor=2)}


@task(name="demo-data", cache_policy=NO_CACHE, **IO_RETRIES)
def ensure_demo_data(demo_dir: Path) -> Path:
    """Generate the demo archive (seed 0) into ``demo_dir`` unless it is already there."""
    return ensure_demo_archive(demo_dir)


def shard_bounds(n_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges covering ``n_rows`` in shards of ``shard_size``."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(start, min(start + shard_size, n_rows)) for start in range(0, n_rows, shard_size)]


@task(
    name="face-visibility-shard",
    task_run_name="visibility-{annotations_csv.stem}-{start}-{stop}",
    cache_policy=VISIBILITY_SHARD_CACHE,
    persist_result=True,
    **IO_RETRIES,
)
def score_visibility_shard(
    annotations_csv: Path, img_dir: Path, start: int, stop: int, workers: int | None
) -> list[float]:
    """Face visibility of rows ``[start, stop)`` of a split; cached per shard, so an
    interrupted scoring resumes at the shard where it stopped."""
    names = pd.read_csv(annotations_csv, usecols=["Crop_name"])["Crop_name"].iloc[start:stop].tolist()
    return score_crops(img_dir, names, workers=workers).tolist()


def shard_scores_problem(scores: Any, start: int, stop: int) -> str | None:
    """What is wrong with a result of :func:`score_visibility_shard` for rows ``[start, stop)``, or None."""
    if not isinstance(scores, list):
        return f"a {type(scores).__name__} where a list of scores belongs"
    if len(scores) != stop - start:
        return f"{len(scores)} face-visibility scores for the {stop - start} rows [{start}, {stop})"
    bad = [v for v in scores if not isinstance(v, float) or not (0.0 <= v <= 100.0 or math.isnan(v))]
    if bad:
        return f"{len(bad)} values that are not scores in [0, 100] or NaN, e.g. {bad[0]!r}"
    return None


def normalized_splits_problem(result: Any, splits: Iterable[str]) -> str | None:
    """What is wrong with a result of :func:`normalize_splits` for ``splits``, or None."""
    expected = sorted(splits)
    if not isinstance(result, tuple) or len(result) != 3:
        return f"a {type(result).__name__} where (frames, normalizer, counts) belongs"
    frames, normalizer, counts = result
    if not isinstance(frames, dict) or sorted(frames) != expected:
        return f"frames for {sorted(frames) if isinstance(frames, dict) else frames!r}, not for the splits {expected}"
    if not all(isinstance(frame, pd.DataFrame) for frame in frames.values()):
        return "frames that are not DataFrames"
    if not isinstance(normalizer, AffectNormalizer):
        return f"a {type(normalizer).__name__} where the AffectNormalizer belongs"
    if not isinstance(counts, dict) or sorted(counts) != expected:
        return f"row counts for {sorted(counts) if isinstance(counts, dict) else counts!r}, not for {expected}"
    return None


@task(name="write-visibility", cache_policy=NO_CACHE, **IO_RETRIES)
def write_visibility(
    annotation_csvs: dict[str, Path], scores: dict[str, list[float]], out_dir: Path
) -> dict[str, dict[str, Any]]:
    """Per split, a copy of the CSV with ``Face_Visibility`` in ``out_dir`` and its
    counts (rows, scored, failed, with a face, whole face, mean); one histogram of all
    splits."""
    summary = {
        split: write_visibility_csv(csv_path, scores[split], Path(out_dir) / csv_path.name).counts()
        for split, csv_path in annotation_csvs.items()
    }
    all_scores = np.concatenate([np.asarray(scores[split], dtype=np.float64) for split in annotation_csvs])
    plot_visibility_histogram(all_scores, Path(out_dir) / "face_visibility.png", title="Face visibility, all splits")
    return summary


@task(name="normalize-affect", cache_policy=CSV_CONTENTS_CACHE, persist_result=True, **IO_RETRIES)
def normalize_splits(
    csv_paths: dict[str, Path],
    min_visibility: float | None,
    fit_on_train: bool,
    filter_test_by_visibility: bool = False,
) -> tuple[dict[str, pd.DataFrame], AffectNormalizer, dict[str, dict[str, int]]]:
    """Validated, filtered and normalized splits, their normalizer and row counts (cached
    on the CSVs' contents; Prefect pickles the result, frames and normalizer as they are)."""
    frames = {split: load_annotations(path) for split, path in csv_paths.items()}
    return normalize_frames(
        frames,
        min_visibility=min_visibility,
        fit_on_train=fit_on_train,
        filter_test_by_visibility=filter_test_by_visibility,
    )


@task(name="write-normalized", cache_policy=NO_CACHE, **IO_RETRIES)
def write_normalized_splits(
    frames: dict[str, pd.DataFrame], normalizer: AffectNormalizer, out_dir: Path
) -> tuple[dict[str, Path], Path]:
    """``normalized_dataset_<split>.csv`` and ``normalization.json``; never cached, so
    the files exist even when the computation above came from the cache."""
    return write_normalized(frames, normalizer, out_dir)
