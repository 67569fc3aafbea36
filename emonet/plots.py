"""Evaluation figures as PNG files: emotion heatmaps, per-emotion bars, affect scatter,
learning curves and the face-visibility histogram.

Figures are built on ``matplotlib.figure.Figure`` directly, not pyplot, so plotting
needs no GUI backend, never changes the caller's backend and is safe from worker
threads; every file is written with ``emonet.utils.io.save_figure_atomic``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from numpy.typing import ArrayLike

from emonet.metrics import divide_rows
from emonet.schema import EMOTIONS
from emonet.utils.io import save_figure_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "plot_affect_scatter",
    "plot_cooccurrence",
    "plot_learning_curves",
    "plot_per_emotion_metrics",
    "plot_true_vs_predicted",
    "plot_visibility_histogram",
]

# Cell annotations stay legible up to about this many labels per axis.
_MAX_ANNOTATED_LABELS = 30
_AFFECT_NAMES: tuple[str, str] = ("Valence", "Arousal")


def _check_square(matrix: ArrayLike, labels: Sequence[str], name: str) -> tuple[np.ndarray, list[str]]:
    array = np.asarray(matrix, dtype=np.float64)
    labels = [str(label) for label in labels]
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ValueError(f"{name} must be a square 2-D matrix, got shape {array.shape}")
    if array.shape[0] != len(labels):
        raise ValueError(f"{name} has shape {array.shape} but {len(labels)} labels were given")
    return array, labels


def _heatmap(
    matrix: np.ndarray,
    labels: list[str],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    colorbar_label: str,
    fraction: bool,
    path: str | Path,
) -> Path:
    n = len(labels)
    # About 0.45 in per cell keeps 26 rotated names and 4-digit counts readable.
    side = max(6.0, 0.45 * n + 3.0)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.add_subplot()
    annotate = n <= _MAX_ANNOTATED_LABELS
    if fraction:
        fmt, vmax = ".2f", 1.0
    else:
        # Counts are integral; "d" fails on float arrays, so format through ".0f".
        fmt, vmax = ".0f", None
    sns.heatmap(
        matrix,
        ax=ax,
        cmap="viridis",
        vmin=0.0,
        vmax=vmax,
        square=True,
        annot=annotate,
        fmt=fmt,
        annot_kws={"fontsize": 7},
        linewidths=0.3,
        linecolor="white",
        # Labelled below: given labels, seaborn draws the figure twice to test them for overlap.
        xticklabels=False,
        yticklabels=False,
        cbar_kws={"label": colorbar_label, "shrink": 0.8},
    )
    ax.set_facecolor("0.85")  # NaN cells (undefined rows) show as gray, not as zero
    # The cell annotations lie inside the axes: left out of the constrained layout's
    # bounding boxes, which otherwise measure all n * n texts on every draw.
    for text in ax.texts:
        text.set_in_layout(False)
    centers = np.arange(n) + 0.5
    ax.set_xticks(centers, labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_yticks(centers, labels, rotation=0, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.set_title(title, fontsize=13)
    return save_figure_atomic(fig, path)


def plot_cooccurrence(
    matrix: ArrayLike,
    path: str | Path,
    title: str = "Emotion co-occurrence",
    labels: Sequence[str] = EMOTIONS,
    normalize: bool = False,
) -> Path:
    """Heatmap of an emotion co-occurrence matrix (see ``metrics.cooccurrence_matrix``).

    Parameters
    ----------
    matrix : array-like of shape (n_labels, n_labels)
        Co-occurrence counts; the diagonal holds each emotion's count.
    path : str or Path
        Where to write the PNG.
    title : str, default="Emotion co-occurrence"
    labels : sequence of str, default=EMOTIONS
    normalize : bool, default=False
        Divide row ``i`` by the diagonal entry ``(i, i)``, so that cell ``(i, j)`` is
        the share of samples with emotion ``i`` that also have ``j``. Rows of
        emotions that never occur are left blank.

    Returns
    -------
    Path
        ``path``.

    Examples
    --------
    >>> from emonet.metrics import cooccurrence_matrix
    >>> plot_cooccurrence(cooccurrence_matrix(y_train), "cooccurrence.png")  # doctest: +SKIP
    """
    matrix, labels = _check_square(matrix, labels, "matrix")
    if normalize:
        matrix = divide_rows(matrix, np.diag(matrix).copy())
    return _heatmap(
        matrix,
        labels,
        title=title,
        xlabel="co-occurring emotion",
        ylabel="emotion",
        colorbar_label="P(column | row)" if normalize else "samples with both",
        fraction=normalize,
        path=path,
    )


def plot_true_vs_predicted(
    matrix: ArrayLike,
    path: str | Path,
    title: str = "True vs predicted emotions",
    labels: Sequence[str] = EMOTIONS,
    normalize: bool = False,
    support: ArrayLike | None = None,
) -> Path:
    """Heatmap of the multi-label "confusion" (see ``metrics.true_vs_predicted_matrix``).

    Parameters
    ----------
    matrix : array-like of shape (n_labels, n_labels)
        Entry ``(i, j)``: samples where emotion ``i`` is true and ``j`` is predicted.
    path : str or Path
        Where to write the PNG.
    title : str, default="True vs predicted emotions"
    labels : sequence of str, default=EMOTIONS
    normalize : bool, default=False
        Row-normalize. With ``support`` (the number of samples where each emotion is
        true, ``y_true.sum(axis=0)``) cells become the rate at which ``j`` is
        predicted given ``i`` (the diagonal is recall); without it each row is
        divided by its sum (the share of the row's predictions). Empty rows are blank.
    support : array-like of shape (n_labels,), optional
        Per-emotion positive counts, used only when ``normalize``.

    Returns
    -------
    Path
        ``path``.

    Examples
    --------
    >>> from emonet.metrics import true_vs_predicted_matrix
    >>> plot_true_vs_predicted(true_vs_predicted_matrix(y_true, y_pred), "tvp.png",
    ...                        normalize=True, support=y_true.sum(axis=0))  # doctest: +SKIP
    """
    matrix, labels = _check_square(matrix, labels, "matrix")
    if normalize:
        if support is None:
            denominator = matrix.sum(axis=1)
            colorbar_label = "share of row's predictions"
        else:
            denominator = np.asarray(support, dtype=np.float64)
            if denominator.shape != (len(labels),):
                raise ValueError(f"support must have shape ({len(labels)},), got {denominator.shape}")
            colorbar_label = "P(predicted | true)"
        matrix = divide_rows(matrix, denominator)
    else:
        colorbar_label = "samples"
    return _heatmap(
        matrix,
        labels,
        title=title,
        xlabel="predicted emotion",
        ylabel="true emotion",
        colorbar_label=colorbar_label,
        fraction=normalize,
        path=path,
    )


_REPORT_BARS: tuple[tuple[str, str], ...] = (
    ("precision", "precision"),
    ("recall", "recall"),
    ("f1", "F1"),
    ("average_precision", "AP"),
)


def plot_per_emotion_metrics(
    report: pd.DataFrame,
    path: str | Path,
    title: str = "Per-emotion metrics",
) -> Path:
    """Horizontal grouped bars of precision, recall, F1 and AP per emotion, with support.

    Parameters
    ----------
    report : pandas.DataFrame
        Output of ``metrics.per_emotion_report``: indexed by emotion, with columns
        ``precision, recall, f1, average_precision, support``. NaN AP (no positive
        sample) is drawn as a missing bar.
    path : str or Path
        Where to write the PNG.
    title : str, default="Per-emotion metrics"

    Returns
    -------
    Path
        ``path``.

    Examples
    --------
    >>> plot_per_emotion_metrics(per_emotion_report(y_true, y_prob), "per_emotion.png")  # doctest: +SKIP
    """
    required = [column for column, _ in _REPORT_BARS] + ["support"]
    missing = [column for column in required if column not in report.columns]
    if missing:
        raise ValueError(f"report is missing columns: {missing}")
    if report.empty:
        raise ValueError("report has no rows")

    names = [str(name) for name in report.index]
    n = len(names)
    positions = np.arange(n)
    height = 0.8 / len(_REPORT_BARS)
    fig = Figure(figsize=(12, max(5.0, 0.42 * n + 1.5)), layout="constrained")
    ax, ax_support = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [4, 1]})
    colors = sns.color_palette("colorblind", len(_REPORT_BARS))
    for k, ((column, label), color) in enumerate(zip(_REPORT_BARS, colors)):
        values = report[column].to_numpy(dtype=np.float64)
        # The first metric sits on top of each group because the y axis runs downward.
        ax.barh(positions + (k - (len(_REPORT_BARS) - 1) / 2) * height, values, height=height, label=label, color=color)
    undefined_ap = report["average_precision"].isna().to_numpy()
    for y in positions[undefined_ap]:
        ax.text(0.01, y, "AP n/a (no positives)", va="center", fontsize=8, color="0.4")
    ax.set_yticks(positions, names, fontsize=9)
    ax.set_ylim(n - 0.5, -0.5)  # first emotion at the top, in the canonical order
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("score")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(_REPORT_BARS), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=13)

    support = report["support"].to_numpy(dtype=np.float64)
    ax_support.barh(positions, support, height=0.6, color="0.6")
    top = float(np.nanmax(support)) if np.isfinite(support).any() else 0.0
    for y, count in zip(positions, support):
        if np.isfinite(count):
            ax_support.text(count + 0.02 * max(top, 1.0), y, f"{int(count)}", va="center", fontsize=8)
    ax_support.set_xlim(0.0, max(top, 1.0) * 1.3)
    ax_support.set_xlabel("support (positives)")
    ax_support.tick_params(axis="y", left=False)
    ax_support.grid(axis="x", alpha=0.3)
    return save_figure_atomic(fig, path)


def _check_affect(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must have shape (n_samples, 2) for (valence, arousal), got {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} has no samples")
    return array


def plot_affect_scatter(
    affect_true: ArrayLike,
    affect_pred: ArrayLike,
    path: str | Path,
    title: str = "Valence and arousal: predicted vs true",
) -> Path:
    """Predicted vs true valence and arousal, plus both on the valence-arousal plane.

    Parameters
    ----------
    affect_true, affect_pred : array-like of shape (n_samples, 2)
        Normalized (valence, arousal) targets and predictions on [-1, 1].
    path : str or Path
        Where to write the PNG.
    title : str, default="Valence and arousal: predicted vs true"

    Returns
    -------
    Path
        ``path``.

    Examples
    --------
    >>> plot_affect_scatter(affect_true, affect_pred, "affect.png")  # doctest: +SKIP
    """
    affect_true = _check_affect(affect_true, "affect_true")
    affect_pred = _check_affect(affect_pred, "affect_pred")
    if affect_true.shape != affect_pred.shape:
        raise ValueError(
            f"affect_true and affect_pred must have the same shape, got {affect_true.shape} and {affect_pred.shape}"
        )
    n = affect_true.shape[0]
    # Dense clouds (the test split has ~7k points) need small, faint markers.
    size, alpha = (14.0, 0.7) if n <= 500 else (4.0, 0.25)
    limits = (-1.05, 1.05)
    fig = Figure(figsize=(16, 5.5), layout="constrained")
    axes = fig.subplots(1, 3)
    for d, (ax, name) in enumerate(zip(axes[:2], _AFFECT_NAMES)):
        mae = float(np.nanmean(np.abs(affect_pred[:, d] - affect_true[:, d])))
        ax.scatter(affect_true[:, d], affect_pred[:, d], s=size, alpha=alpha, color="tab:blue", linewidths=0)
        ax.plot(limits, limits, color="black", linestyle="--", linewidth=1, label="identity")
        ax.set_xlim(limits)
        ax.set_ylim(limits)
        ax.set_aspect("equal")
        ax.set_xlabel(f"true {name.lower()} (normalized)")
        ax.set_ylabel(f"predicted {name.lower()} (normalized)")
        ax.set_title(f"{name} (MAE {mae:.3f})")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=9)

    ax = axes[2]
    ax.scatter(affect_true[:, 0], affect_true[:, 1], s=size, alpha=alpha, color="tab:gray", linewidths=0, label="true")
    ax.scatter(
        affect_pred[:, 0], affect_pred[:, 1], s=size, alpha=alpha, color="tab:orange", linewidths=0, label="predicted"
    )
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.axvline(0.0, color="black", linewidth=0.6)
    ax.set_xlim(limits)
    ax.set_ylim(limits)
    ax.set_aspect("equal")
    ax.set_xlabel("valence (normalized)")
    ax.set_ylabel("arousal (normalized)")
    ax.set_title("Valence-arousal plane")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9, markerscale=2.0)
    fig.suptitle(f"{title} (n={n})", fontsize=13)
    return save_figure_atomic(fig, path)


# Panels of the learning-curve figure, in order, with the test that puts a key there.
_PANELS: tuple[tuple[str, str], ...] = (
    ("loss", "Loss"),
    ("score", "Scores (higher is better)"),
    ("error", "Errors (lower is better)"),
    ("lr", "Learning rate"),
    ("other", "Other"),
)
_X_KEYS: tuple[str, ...] = ("epoch", "step")


def _panel_of(key: str) -> str:
    lowered = key.lower()
    if lowered in ("lr", "learning_rate") or lowered.startswith("lr_") or lowered.endswith("_lr"):
        return "lr"
    if "loss" in lowered and "hamming" not in lowered:
        return "loss"
    if any(word in lowered for word in ("mae", "error", "hamming")):
        return "error"
    if any(word in lowered for word in ("map", "f1", "accuracy", "precision", "recall", "score", "auc")):
        return "score"
    return "other"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def plot_learning_curves(history: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """Per-epoch curves: losses, validation scores, errors and the learning rate.

    Parameters
    ----------
    history : sequence of mapping
        One dict per epoch, e.g. ``{"epoch": 1, "train_loss": 0.7, "val_loss": 0.8,
        "val_mAP": 0.21, "val_mae_valence": 0.3, "lr": 1e-3}``. Every numeric key is
        plotted; panels (loss, scores, errors, learning rate on a log scale, other)
        appear only for keys present. ``epoch`` (or ``step``) is the x axis when
        every entry has it, else the entry's position from 1. A key missing from an
        epoch leaves a gap.
    path : str or Path
        Where to write the PNG.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        If ``history`` is empty or holds no numeric key to plot.

    Examples
    --------
    >>> plot_learning_curves([{"epoch": 1, "train_loss": 0.9}, {"epoch": 2, "train_loss": 0.6}],
    ...                      "curves.png")  # doctest: +SKIP
    """
    if isinstance(history, Mapping) or not isinstance(history, Sequence):
        raise ValueError(f"history must be a sequence of per-epoch dicts, got {type(history).__name__}")
    if len(history) == 0:
        raise ValueError("history is empty: nothing to plot")
    for i, entry in enumerate(history):
        if not isinstance(entry, Mapping):
            raise ValueError(f"history[{i}] must be a mapping, got {type(entry).__name__}")

    x_key = next((key for key in _X_KEYS if all(_is_number(entry.get(key)) for entry in history)), None)
    x = (
        np.array([float(entry[x_key]) for entry in history])
        if x_key is not None
        else np.arange(1, len(history) + 1, dtype=np.float64)
    )

    keys: list[str] = []
    skipped: set[str] = set()
    for entry in history:
        for key, value in entry.items():
            if key in _X_KEYS or key in keys:
                continue
            if _is_number(value):
                keys.append(key)
            else:
                skipped.add(key)
    if skipped - set(keys):
        logger.debug("learning curves skip non-numeric keys: %s", sorted(skipped - set(keys)))
    if not keys:
        raise ValueError(f"history holds no numeric values to plot (keys: {sorted(skipped)})")

    grouped: dict[str, list[str]] = {panel: [] for panel, _ in _PANELS}
    for key in keys:
        grouped[_panel_of(key)].append(key)
    panels = [(panel, panel_title) for panel, panel_title in _PANELS if grouped[panel]]

    n_cols = 1 if len(panels) == 1 else 2
    n_rows = math.ceil(len(panels) / n_cols)
    fig = Figure(figsize=(7.0 * n_cols, 4.2 * n_rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False).ravel())
    marker = "o" if len(history) <= 30 else None
    for ax, (panel, panel_title) in zip(axes, panels):
        for key in grouped[panel]:
            y = np.array([float(entry[key]) if _is_number(entry.get(key)) else np.nan for entry in history])
            # Validation curves dashed so train/val pairs read apart even in grayscale.
            linestyle = "--" if key.lower().startswith("val") else "-"
            ax.plot(x, y, marker=marker, markersize=3, linestyle=linestyle, label=key)
        if panel == "lr":
            values = np.array(
                [float(entry[k]) for entry in history for k in grouped[panel] if _is_number(entry.get(k))]
            )
            if (values > 0).all():
                ax.set_yscale("log")
        ax.set_title(panel_title)
        ax.set_xlabel(x_key or "epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(f"Learning curves ({len(history)} epochs)", fontsize=13)
    return save_figure_atomic(fig, path)


def plot_visibility_histogram(scores: ArrayLike, path: str | Path, title: str | None = None) -> Path:
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
    ax.set_xlabel("Face visibility (% of face landmarks inside the crop)")
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
