"""Prefect task for batch inference: a thin wrapper over :func:`emonet.inference.csv_scoring.predict_csv`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from emonet.data.images import DEFAULT_MAX_PIXELS
from emonet.inference.csv_scoring import predict_csv

# Errors the caller made (a missing file, a bad column, an unknown option): retrying
# cannot fix them, so they fail at once instead of after the backoff.
_NOT_RETRIED: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, TypeError)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn``: retry unless the failure is a user error (see ``_NOT_RETRIED``).

    Transient failures worth a retry: the model registry or artifact store briefly
    unreachable, a network file system hiccup, CUDA out of memory under contention.
    """
    try:
        state.result()
    except _NOT_RETRIED:
        return False
    except Exception:
        return True
    return True


@task(
    name="batch-predict",
    task_run_name="predict-{input_csv.name}",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=retry_transient,
    # The output depends on the model behind an alias and on files that may change.
    cache_policy=NO_CACHE,
)
def batch_predict(
    model_uri: str,
    input_csv: Path,
    output_csv: Path,
    img_dir: Path | None = None,
    batch_size: int = 64,
    on_error: Literal["raise", "skip"] = "raise",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    runtime: str = "auto",
) -> dict[str, Any]:
    """Score every row of ``input_csv`` with ``model_uri`` into ``output_csv``; returns the summary."""
    summary = predict_csv(
        model_uri,
        input_csv,
        output_csv,
        img_dir=img_dir,
        batch_size=batch_size,
        progress=False,
        on_error=on_error,
        max_pixels=max_pixels,
        runtime=runtime,
    )
    logger = get_run_logger()
    logger.info(
        "%s: %d rows predicted with %s, %d skipped -> %s",
        input_csv.name,
        summary["rows_written"],
        summary["runtime"],
        summary["rows_skipped"],
        output_csv,
    )
    return summary
