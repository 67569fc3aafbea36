"""A visual review of what a trained model does on a labelled split: a grid of crops with
predicted vs true emotions, one detailed page per sample, split-wide heatmaps, and an
``index.html`` that shows them all without a server."""

from __future__ import annotations

import html
import logging
import math
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.offsetbox import AnchoredOffsetbox, HPacker, TextArea, VPacker
from matplotlib.patches import Rectangle
from tqdm.auto import tqdm

from emonet.batch import ModelSource, describe_model, load_predictor
from emonet.annotations import load_annotations, scaled_box
from emonet.arrays import load_array
from emonet.evaluation import SPLIT_REPORT_FILES, write_split_report
from emonet.inference import PROB_COLUMNS, Predictor
from emonet.io import atomic_open, check_not_inputs, save_figure_atomic, write_csv_atomic, write_json_atomic
from emonet.metrics import (
    binarize,
    mean_average_precision_score,
    multilabel_scores,
)
from emonet.normalize import AffectNormalizer
from emonet.schema import (
    AFFECT_COLUMNS,
    AFFECT_NORM_COLUMNS,
    EMOTIONS,
    FACE_VISIBILITY_COLUMN,
    NUM_EMOTIONS,
    SCALE_MAX,
    SCALE_MIN,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SORT_OPTIONS",
    "affect_sample_error",
    "confidence_score",
    "rank_samples",
    "review_predictions_with_visualization",
    "sample_f1_score",
]

SORT_OPTIONS: tuple[str, ...] = ("random", "best", "worst", "confidence")

# Colours of the emotion labels, in the grid, the detailed pages and the HTML.
HIT = "#1a9641"  # predicted and true
FALSE_POSITIVE = "#d7191c"  # predicted, not true
MISSED = "#7f7f7f"  # true, not predicted
NEGATIVE = "#d9d9d9"  # neither (probability bars only)

GRID_FILE = "grid.png"
SAMPLES_DIR = "samples"
SUMMARY_FILE = "summary.json"
INDEX_FILE = "index.html"
REVIEW_CSV = "review.csv"
PER_EMOTION_CSV = SPLIT_REPORT_FILES["per_emotion_csv"]
FIGURE_FILES: dict[str, str] = {key: name for key, name in SPLIT_REPORT_FILES.items() if name.endswith(".png")}

_GRID_COLUMNS = 5
# The grid stays one readable PNG (Agg caps images at 2**16 px a side); index.html's
# table still lists every selected sample.
MAX_GRID_SAMPLES = 100
_GRID_FONT = 8.0  # points; readable at the saved 120 dpi
_GRID_CELL_WIDTH = 2.9  # inches
_GRID_IMAGE_HEIGHT = 2.5
_GRID_TEXT_HEIGHT = 1.45
_GRID_LIST_LINES = 3  # wrapped lines per emotion list before "+N more"
_DISPLAY_SIDE = 900  # full images are shown subsampled to about this many pixels per side


# --------------------------------------------------------------------------- per-sample scores


def sample_f1_score(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """F1 of each sample's predicted emotion set against its true set.

    ``F1 = 2 |T & P| / (|T| + |P|)``; defined as 1.0 when both sets are empty (nothing
    to find, nothing claimed) and 0.0 when exactly one is empty.

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n_samples, n_labels), 0/1.

    Returns
    -------
    ndarray of float64, shape (n_samples,)

    Examples
    --------
    >>> sample_f1_score(np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]]), np.array([[1, 0, 0], [0, 0, 0], [0, 1, 0]]))
    array([0.66666667, 1.        , 0.        ])
    """
    y_true = np.asarray(y_true).astype(bool)
    y_pred = np.asarray(y_pred).astype(bool)
    if y_true.shape != y_pred.shape or y_true.ndim != 2:
        raise ValueError(f"y_true and y_pred must be 2-D with the same shape, got {y_true.shape} and {y_pred.shape}")
    overlap = (y_true & y_pred).sum(axis=1).astype(np.float64)
    sizes = (y_true.sum(axis=1) + y_pred.sum(axis=1)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2.0 * overlap / sizes
    f1[sizes == 0] = 1.0
    return f1


def affect_sample_error(affect_true: np.ndarray, affect_pred: np.ndarray) -> np.ndarray:
    """Mean absolute valence/arousal error of each sample on the [-1, 1] scale, shape ``(n,)``."""
    affect_true = np.asarray(affect_true, dtype=np.float64)
    affect_pred = np.asarray(affect_pred, dtype=np.float64)
    if affect_true.shape != affect_pred.shape or affect_true.ndim != 2 or affect_true.shape[1] != 2:
        raise ValueError(f"expected two (n, 2) arrays, got {affect_true.shape} and {affect_pred.shape}")
    return np.abs(affect_pred - affect_true).mean(axis=1)


def confidence_score(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How decided the model is about each sample: mean ``|prob - threshold|`` over emotions.

    0 when every probability sits on its threshold; up to 1 when all are at 0 or 1
    far from their thresholds. Shape ``(n,)``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if probs.ndim != 2 or thresholds.shape != (probs.shape[1],):
        raise ValueError(f"expected probs (n, k) and thresholds (k,), got {probs.shape} and {thresholds.shape}")
    return np.abs(probs - thresholds[None, :]).mean(axis=1)


def _check_sort_by(sort_by: str) -> None:
    if sort_by not in SORT_OPTIONS:
        raise ValueError(f"unknown sort_by {sort_by!r}; expected one of {list(SORT_OPTIONS)}")


def rank_samples(
    sort_by: str,
    f1: np.ndarray,
    va_error: np.ndarray,
    confidence: np.ndarray,
    seed: int = 0,
) -> np.ndarray:
    """The review order of the samples: indices, first shown first.

    Parameters
    ----------
    sort_by :
        - ``"random"``: a permutation drawn with ``numpy.random.default_rng(seed)``;
        - ``"best"``: highest per-sample F1 first; equal F1 goes to the lower
          valence/arousal error (``va_error``) first;
        - ``"worst"``: the exact reverse of ``"best"``: lowest F1 first, and among
          equal F1 the larger valence/arousal error first;
        - ``"confidence"``: highest ``confidence`` first (most decided model).

        Remaining ties keep the split's row order.
    f1, va_error, confidence : per-sample arrays of shape ``(n,)`` (see
        :func:`sample_f1_score`, :func:`affect_sample_error`, :func:`confidence_score`).
    seed : seeds ``"random"``; the other orders do not depend on it.

    Returns
    -------
    ndarray of int64, shape (n,)

    Raises
    ------
    ValueError
        An unknown ``sort_by`` (the options are listed) or arrays of different lengths.

    Examples
    --------
    >>> rank_samples("best", np.array([0.5, 1.0, 0.5]), np.array([0.3, 0.2, 0.1]), np.zeros(3)).tolist()
    [1, 2, 0]
    """
    _check_sort_by(sort_by)
    f1, va_error, confidence = (np.asarray(a, dtype=np.float64) for a in (f1, va_error, confidence))
    n = len(f1)
    if va_error.shape != (n,) or confidence.shape != (n,):
        raise ValueError(f"f1, va_error and confidence must have one value per sample, got "
                         f"{f1.shape}, {va_error.shape}, {confidence.shape}")
    index = np.arange(n)
    if sort_by == "random":
        return np.random.default_rng(seed).permutation(n)
    if sort_by == "best":
        # np.lexsort sorts by the LAST key first.
        return np.lexsort((index, va_error, -f1))
    if sort_by == "worst":
        return np.lexsort((index, -va_error, f1))
    return np.lexsort((index, -confidence))


# --------------------------------------------------------------------------- prediction


def _predict_split(
    predictor: Predictor, annotations: pd.DataFrame, img_dir: Path, csv_name: str, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``(N, 26)`` and affect ``(N, 2)`` for every row, one batch of images at a time."""
    n = len(annotations)
    probs = np.empty((n, NUM_EMOTIONS), dtype=np.float32)
    affect = np.empty((n, 2), dtype=np.float32)
    crop_names = annotations["Crop_name"].tolist()
    image_names = annotations["Arr_name"].tolist()
    batch = predictor.batch_size
    starts = range(0, n, batch)
    for start in tqdm(starts, desc="review: predict", unit="batch", disable=not progress, dynamic_ncols=True):
        stop = min(start + batch, n)
        crops, contexts = [], []
        for row in range(start, stop):
            try:
                # Memory maps: pixels are read when the transform touches them.
                crops.append(load_array(img_dir, crop_names[row]))
                if predictor.needs_context:
                    contexts.append(load_array(img_dir, image_names[row]))
            except (ValueError, FileNotFoundError) as error:
                raise type(error)(f"{csv_name}: row {row}: {error}") from None
        probs[start:stop], affect[start:stop] = predictor.predict_proba(crops, contexts or None)
    return probs, affect


def _affect_truth(annotations: pd.DataFrame, normalizer: AffectNormalizer) -> tuple[np.ndarray, np.ndarray]:
    """True valence/arousal on [-1, 1] and on the 1..10 scale, each ``(N, 2)``."""
    raw = annotations[list(AFFECT_COLUMNS)].to_numpy(dtype=np.float64)
    if all(column in annotations.columns for column in AFFECT_NORM_COLUMNS):
        norm = annotations[list(AFFECT_NORM_COLUMNS)].to_numpy(dtype=np.float64)
    else:
        norm, _ = normalizer.transform(raw)
    return norm, raw


def _csv_rows(annotations: pd.DataFrame) -> np.ndarray:
    """0-based data rows of the CSV for the validated frame (load_annotations may drop rows)."""
    rejected = {int(r["row"]) for r in annotations.attrs.get("rejected", [])}
    total = len(annotations) + len(rejected)
    return np.array([i for i in range(total) if i not in rejected], dtype=np.int64)


def _names(mask: np.ndarray, order: np.ndarray | None = None) -> list[str]:
    indices = np.flatnonzero(mask)
    if order is not None:
        indices = indices[np.argsort(-order[indices], kind="stable")]
    return [EMOTIONS[j] for j in indices]


def _build_table(
    annotations: pd.DataFrame,
    probs: np.ndarray,
    affect_pred: np.ndarray,
    predictor: Predictor,
    sort_by: str,
    seed: int,
    num_samples: int,
    detailed: int,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    y_true = annotations[list(EMOTIONS)].to_numpy(dtype=np.int64)  # (N, 26)
    y_pred = binarize(probs, predictor.thresholds)  # (N, 26)
    true_norm, true_raw = _affect_truth(annotations, predictor.normalizer)
    pred_raw = predictor.normalizer.inverse_transform(affect_pred)
    f1 = sample_f1_score(y_true, y_pred)
    va_error = affect_sample_error(true_norm, affect_pred)
    confidence = confidence_score(probs, predictor.thresholds)
    order = rank_samples(sort_by, f1, va_error, confidence, seed)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)

    table = pd.DataFrame(
        {
            "rank": rank,
            "selected": rank <= num_samples,
            "detailed": rank <= detailed,
            "csv_row": _csv_rows(annotations),
            "crop_name": annotations["Crop_name"].astype(str).to_numpy(),
            "arr_name": annotations["Arr_name"].astype(str).to_numpy(),
            "filename": annotations["Filename"].astype(str).to_numpy(),
        }
    )
    table[list(PROB_COLUMNS)] = probs.astype(np.float64)
    table["pred_emotions"] = [";".join(_names(row, p)) for row, p in zip(y_pred, probs)]
    table["true_emotions"] = [";".join(_names(row)) for row in y_true]
    table["n_pred"] = y_pred.sum(axis=1)
    table["n_true"] = y_true.sum(axis=1)
    table["n_correct"] = (y_true & y_pred).sum(axis=1)
    table["f1"] = f1
    affect_pred = affect_pred.astype(np.float64)
    table["valence_pred"], table["arousal_pred"] = affect_pred[:, 0], affect_pred[:, 1]
    table["valence_true"], table["arousal_true"] = true_norm[:, 0], true_norm[:, 1]
    table["valence_pred_1_10"], table["arousal_pred_1_10"] = pred_raw[:, 0], pred_raw[:, 1]
    table["valence_true_1_10"], table["arousal_true_1_10"] = true_raw[:, 0], true_raw[:, 1]
    table["va_error"] = va_error
    table["confidence"] = confidence
    if FACE_VISIBILITY_COLUMN in annotations.columns:
        table[FACE_VISIBILITY_COLUMN] = pd.to_numeric(annotations[FACE_VISIBILITY_COLUMN], errors="coerce").to_numpy()
    table["sample_page"] = ""
    return table, y_true, y_pred


# --------------------------------------------------------------------------- drawing helpers


def _wrap_tokens(tokens: list[tuple[str, str]], width: int, max_lines: int) -> list[list[tuple[str, str]]]:
    """Greedy word wrap of coloured tokens into lines of at most ``width`` characters.

    Lines beyond ``max_lines`` are folded into a grey "+N more" at the end, so a model
    that predicts every emotion still fits its cell.
    """
    lines: list[list[tuple[str, str]]] = [[]]
    used = 0
    for k, (text, colour) in enumerate(tokens):
        piece = text + ("," if k < len(tokens) - 1 else "")
        if lines[-1] and used + 1 + len(piece) > width:
            lines.append([])
            used = 0
        lines[-1].append((piece, colour))
        used += len(piece) + (1 if used else 0)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        # Drop tokens from the last kept line until "+N more" fits beside them.
        while True:
            shown = sum(len(line) for line in lines)
            more = f"+{len(tokens) - shown} more"
            used = sum(len(text) + 1 for text, _ in lines[-1])
            if not lines[-1] or used + len(more) <= width:
                break
            lines[-1].pop()
        lines[-1].append((more, MISSED))
    return lines


def _token_lines(
    label: str, tokens: list[tuple[str, str]], width: int, max_lines: int, fontsize: float
) -> list[HPacker]:
    """One HPacker per wrapped line: a bold label, then the coloured tokens."""
    if not tokens:
        tokens = [("(none)", MISSED)]
    wrapped = _wrap_tokens(tokens, width - len(label) - 1, max_lines)
    rows = []
    for i, line in enumerate(wrapped):
        head = TextArea(label if i == 0 else " " * len(label), textprops={"fontsize": fontsize, "fontweight": "bold",
                                                                          "family": "DejaVu Sans Mono"})
        parts = [TextArea(text, textprops={"fontsize": fontsize, "color": colour}) for text, colour in line]
        rows.append(HPacker(children=[head, *parts], align="baseline", pad=0, sep=3))
    return rows


def _emotion_tokens(row: pd.Series) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    pred = [e for e in str(row["pred_emotions"]).split(";") if e]
    true = [e for e in str(row["true_emotions"]).split(";") if e]
    true_set, pred_set = set(true), set(pred)
    # Hits first, so a long list folded into "+N more" never hides what the model got right.
    pred_tokens = [(e, HIT) for e in pred if e in true_set] + [(e, FALSE_POSITIVE) for e in pred if e not in true_set]
    true_tokens = [(e, HIT if e in pred_set else MISSED) for e in true]
    return pred_tokens, true_tokens


def _display_image(array: np.ndarray) -> tuple[np.ndarray, int]:
    """A subsampled copy for display (every ``step``-th pixel) and the step used."""
    step = max(1, math.ceil(max(array.shape[:2]) / _DISPLAY_SIDE))
    return np.asarray(array[::step, ::step]), step


def _fmt(value: float, spec: str = ".2f") -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


# --------------------------------------------------------------------------- grid


def _plot_grid(table: pd.DataFrame, img_dir: Path, path: Path, title: str) -> Path:
    """The selected crops in rank order with their emotions and valence/arousal below."""
    selected = table[table["selected"]].sort_values("rank").head(MAX_GRID_SAMPLES)
    n = len(selected)
    n_cols = min(_GRID_COLUMNS, n)
    n_rows = math.ceil(n / n_cols)
    cell_height = _GRID_IMAGE_HEIGHT + _GRID_TEXT_HEIGHT
    fig = Figure(figsize=(n_cols * _GRID_CELL_WIDTH, n_rows * cell_height + 0.9))
    # Fixed geometry (no constrained layout): the text boxes must not shrink the images.
    top = 1.0 - 0.9 / (n_rows * cell_height + 0.9)
    grid = fig.add_gridspec(
        2 * n_rows, n_cols, height_ratios=[_GRID_IMAGE_HEIGHT, _GRID_TEXT_HEIGHT] * n_rows,
        left=0.01, right=0.99, top=top, bottom=0.005, hspace=0.08, wspace=0.06,
    )
    # Characters per text line: cell width in points over an average glyph width.
    width_chars = int(_GRID_CELL_WIDTH * 72 / (_GRID_FONT * 0.6))
    for k, (_, row) in enumerate(selected.iterrows()):
        r, c = divmod(k, n_cols)
        ax_img = fig.add_subplot(grid[2 * r, c])
        ax_img.imshow(np.asarray(load_array(img_dir, row["crop_name"])))
        ax_img.set_xticks([])
        ax_img.set_yticks([])
        edge = HIT if row["f1"] >= 0.5 else FALSE_POSITIVE
        for spine in ax_img.spines.values():
            spine.set_edgecolor(edge)
            spine.set_linewidth(2)
        ax_img.set_title(
            f"#{row['rank']}  {Path(row['crop_name']).stem}  F1 {row['f1']:.2f}", fontsize=_GRID_FONT + 0.5, pad=3
        )
        ax_txt = fig.add_subplot(grid[2 * r + 1, c])
        ax_txt.set_axis_off()
        pred_tokens, true_tokens = _emotion_tokens(row)
        lines = _token_lines("pred", pred_tokens, width_chars, _GRID_LIST_LINES, _GRID_FONT)
        lines += _token_lines("true", true_tokens, width_chars, _GRID_LIST_LINES, _GRID_FONT)
        affect = (f"val {row['valence_pred_1_10']:.1f} (true {row['valence_true_1_10']:.1f})  "
                  f"aro {row['arousal_pred_1_10']:.1f} (true {row['arousal_true_1_10']:.1f})")
        lines.append(TextArea(affect, textprops={"fontsize": _GRID_FONT, "color": "black"}))
        box = VPacker(children=lines, align="left", pad=0, sep=2)
        ax_txt.add_artist(AnchoredOffsetbox(loc="upper left", child=box, frameon=False, pad=0, borderpad=0.1,
                                            bbox_to_anchor=(0.0, 1.0), bbox_transform=ax_txt.transAxes))
    fig.suptitle(title, fontsize=12, y=1.0 - 0.25 / (n_rows * cell_height + 0.9), va="top")
    key = HPacker(
        children=[
            TextArea("emotions:", textprops={"fontsize": 9}),
            TextArea("correct", textprops={"fontsize": 9, "color": HIT, "fontweight": "bold"}),
            TextArea("false positive", textprops={"fontsize": 9, "color": FALSE_POSITIVE, "fontweight": "bold"}),
            TextArea("missed", textprops={"fontsize": 9, "color": MISSED, "fontweight": "bold"}),
            TextArea("|  valence/arousal on the 1-10 scale  |  frame green when F1 >= 0.5", textprops={"fontsize": 9}),
        ],
        align="baseline", pad=0, sep=6,
    )
    fig.add_artist(AnchoredOffsetbox(loc="upper center", child=key, frameon=False, pad=0, borderpad=0,
                                     bbox_to_anchor=(0.5, 1.0 - 0.55 / (n_rows * cell_height + 0.9)),
                                     bbox_transform=fig.transFigure))
    return save_figure_atomic(fig, path)


# --------------------------------------------------------------------------- detailed page


_QUADRANTS = (
    (0.97, 0.97, "pleasant / activated", "right", "top"),
    (0.03, 0.97, "unpleasant / activated", "left", "top"),
    (0.03, 0.03, "unpleasant / calm", "left", "bottom"),
    (0.97, 0.03, "pleasant / calm", "right", "bottom"),
)


def _draw_probabilities(ax: Any, probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray) -> None:
    predicted = probs >= thresholds
    colours = [
        HIT if p and t else FALSE_POSITIVE if p else MISSED if t else NEGATIVE for p, t in zip(predicted, truth)
    ]
    y = np.arange(NUM_EMOTIONS)
    ax.barh(y, probs, height=0.7, color=colours, edgecolor="0.4", linewidth=0.4)
    for j in y:
        ax.plot([thresholds[j]] * 2, [j - 0.45, j + 0.45], color="black", linewidth=1.6)
        ax.text(min(probs[j] + 0.01, 0.9), j, f"{probs[j]:.2f}", va="center", fontsize=8, color="0.15")
    ax.set_yticks(y, [f"{e}  \u25cf" if t else e for e, t in zip(EMOTIONS, truth)], fontsize=9)
    for label, t in zip(ax.get_yticklabels(), truth):
        if t:
            label.set_fontweight("bold")
    ax.set_ylim(NUM_EMOTIONS - 0.5, -0.5)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("probability")
    ax.grid(axis="x", alpha=0.3)
    handles = [
        Rectangle((0, 0), 1, 1, color=HIT, label="predicted, true"),
        Rectangle((0, 0), 1, 1, color=FALSE_POSITIVE, label="predicted, not true"),
        Rectangle((0, 0), 1, 1, color=MISSED, label="true, missed"),
        Rectangle((0, 0), 1, 1, color=NEGATIVE, label="neither"),
    ]
    handles.append(Line2D([0], [0], color="black", linewidth=1.6, label="threshold"))
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    ax.set_title("Emotion probabilities (\u25cf bold = true emotion)", fontsize=11, pad=42)


def _draw_affect(ax: Any, row: pd.Series, low: float, high: float) -> None:
    mid = (low + high) / 2.0
    ax.axhline(mid, color="0.5", linewidth=0.8)
    ax.axvline(mid, color="0.5", linewidth=0.8)
    for x, y, text, ha, va in _QUADRANTS:
        ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, fontsize=8, color="0.45", style="italic")
    true_xy = (row["valence_true_1_10"], row["arousal_true_1_10"])
    pred_xy = (row["valence_pred_1_10"], row["arousal_pred_1_10"])
    ax.annotate("", xy=pred_xy, xytext=true_xy, arrowprops={"arrowstyle": "->", "color": "0.4", "linewidth": 1.0})
    ax.scatter(*true_xy, s=110, marker="o", color="black", label="true", zorder=3)
    ax.scatter(*pred_xy, s=130, marker="X", color="tab:orange", edgecolor="black", linewidth=0.6, label="predicted",
               zorder=4)
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_aspect("equal")
    ax.set_xlabel("valence (1-10)")
    ax.set_ylabel("arousal (1-10)")
    ax.grid(alpha=0.25)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    ax.set_title("Valence-arousal space", fontsize=11)


def _summary_text(row: pd.Series, n: int, sort_by: str, has_visibility: bool) -> str:
    pred_tokens, true_tokens = _emotion_tokens(row)
    correct = [e for e, c in pred_tokens if c == HIT]
    false_pos = [e for e, c in pred_tokens if c == FALSE_POSITIVE]
    missed = [e for e, c in true_tokens if c == MISSED]
    if has_visibility:
        visibility = row.get(FACE_VISIBILITY_COLUMN)
        face = f"{_fmt(visibility, '.1f')} %" if visibility is not None else "n/a"
    else:
        face = f"n/a (no {FACE_VISIBILITY_COLUMN} column)"
    v_err = abs(row["valence_pred_1_10"] - row["valence_true_1_10"])
    a_err = abs(row["arousal_pred_1_10"] - row["arousal_true_1_10"])

    def listed(name: str, items: list[str]) -> list[str]:
        return textwrap.wrap(f"{name} ({len(items)}): {', '.join(items) or '-'}", width=52, subsequent_indent="    ")

    lines = [
        f"rank {row['rank']} of {n} (sorted by {sort_by})",
        f"crop {row['crop_name']} (CSV row {row['csv_row']})",
        f"photo {row['filename']}",
        "",
        f"emotion F1        {row['f1']:.3f}",
        f"valence 1-10      pred {row['valence_pred_1_10']:.2f}  true {row['valence_true_1_10']:.2f}  err {v_err:.2f}",
        f"arousal 1-10      pred {row['arousal_pred_1_10']:.2f}  true {row['arousal_true_1_10']:.2f}  err {a_err:.2f}",
        f"VA error [-1, 1]  {row['va_error']:.3f} (mean abs)",
        f"confidence        {row['confidence']:.3f} (mean |p - thr|)",
        f"face visibility   {face}",
        "",
        *listed("correct", correct),
        *listed("false positives", false_pos),
        *listed("missed", missed),
    ]
    return "\n".join(lines)


def _plot_sample(
    row: pd.Series,
    img_dir: Path,
    annotation: pd.Series,
    thresholds: np.ndarray,
    bounds: tuple[float, float],
    n: int,
    sort_by: str,
    has_visibility: bool,
    path: Path,
) -> Path:
    fig = Figure(figsize=(17, 9.5), layout="constrained")
    grid = fig.add_gridspec(2, 3, width_ratios=[1.0, 1.25, 1.05], height_ratios=[1.0, 1.0])
    ax_crop = fig.add_subplot(grid[0, 0])
    ax_crop.imshow(np.asarray(load_array(img_dir, row["crop_name"])))
    ax_crop.set_title(f"body crop {row['crop_name']}", fontsize=10)
    ax_crop.set_axis_off()

    ax_full = fig.add_subplot(grid[1, 0])
    ax_full.set_axis_off()
    try:
        full = load_array(img_dir, row["arr_name"])
        left, top, right, bottom = scaled_box(annotation, full.shape)
        shown, step = _display_image(full)
        ax_full.imshow(shown)
        ax_full.add_patch(Rectangle((left / step, top / step), (right - left) / step, (bottom - top) / step,
                                    fill=False, edgecolor="yellow", linewidth=2.2))
        ax_full.add_patch(Rectangle((left / step, top / step), (right - left) / step, (bottom - top) / step,
                                    fill=False, edgecolor="black", linewidth=0.8, linestyle="--"))
        ax_full.set_title(f"full image {row['arr_name']} with the body box", fontsize=10)
    except (ValueError, FileNotFoundError) as error:
        # The crop alone still makes a useful page.
        logger.debug("no full image for %s: %s", row["crop_name"], error)
        ax_full.text(0.5, 0.5, f"full image not available\n({row['arr_name']})", ha="center", va="center",
                     fontsize=10, color="0.4", transform=ax_full.transAxes)

    ax_bars = fig.add_subplot(grid[:, 1])
    probs = row[list(PROB_COLUMNS)].to_numpy(dtype=np.float64)
    truth = np.array([e in set(str(row["true_emotions"]).split(";")) for e in EMOTIONS])
    _draw_probabilities(ax_bars, probs, truth, thresholds)

    _draw_affect(fig.add_subplot(grid[0, 2]), row, *bounds)
    ax_text = fig.add_subplot(grid[1, 2])
    ax_text.set_axis_off()
    ax_text.text(0.0, 1.0, _summary_text(row, n, sort_by, has_visibility), transform=ax_text.transAxes, va="top",
                 ha="left", fontsize=9, family="DejaVu Sans Mono", linespacing=1.35)
    fig.suptitle(f"Sample #{row['rank']}: {row['crop_name']}  (F1 {row['f1']:.2f}, VA error {row['va_error']:.2f})",
                 fontsize=13)
    return save_figure_atomic(fig, path)


def _page_name(rank: int, crop_name: str, digits: int) -> str:
    return f"sample_{rank:0{digits}d}_{Path(crop_name).stem}.png"


# --------------------------------------------------------------------------- HTML


def _href(relative: str) -> str:
    return html.escape(quote(relative), quote=True)


def _emotion_spans(tokens: list[tuple[str, str]]) -> str:
    if not tokens:
        return '<span style="color:#7f7f7f">(none)</span>'
    return ", ".join(f'<span style="color:{c}">{html.escape(e)}</span>' for e, c in tokens)


def _write_index(path: Path, summary: dict[str, Any], table: pd.DataFrame, has_visibility: bool) -> Path:
    esc = html.escape
    files = summary["files"]
    metric_rows = "".join(
        f"<tr><th>{esc(label)}</th><td>{esc(value)}</td></tr>"
        for label, value in (
            ("model", summary["model"]),
            ("test CSV", summary["test_csv"]),
            ("samples in split", str(summary["n_samples"])),
            ("rows rejected while loading", str(summary["rows_rejected"])),
            ("shown in grid", f"{summary['n_selected']} (sorted by {summary['sort_by']}, seed {summary['seed']})"),
            ("detailed pages", str(summary["n_detailed"])),
            ("mAP", _fmt(summary["mAP"], ".4f")),
            ("macro F1 / micro F1", f"{_fmt(summary['f1_macro'], '.4f')} / {_fmt(summary['f1_micro'], '.4f')}"),
            ("mean per-sample F1", _fmt(summary["mean_sample_f1"], ".4f")),
            ("valence / arousal MAE (1-10)",
             f"{_fmt(summary['mae_valence_1_10'])} / {_fmt(summary['mae_arousal_1_10'])}"),
        )
    )
    selected = table[table["selected"]].sort_values("rank")
    header = ["rank", "crop", "F1", "predicted", "true", "valence pred / true", "arousal pred / true"]
    if has_visibility:
        header.append("face visibility")
    body = []
    for _, row in selected.iterrows():
        pred_tokens, true_tokens = _emotion_tokens(row)
        crop = esc(str(row["crop_name"]))
        if row["sample_page"]:
            crop = f'<a href="{_href(row["sample_page"])}">{crop}</a>'
        cells = [
            str(row["rank"]),
            crop,
            f"{row['f1']:.2f}",
            _emotion_spans(pred_tokens),
            _emotion_spans(true_tokens),
            f"{row['valence_pred_1_10']:.2f} / {row['valence_true_1_10']:.2f}",
            f"{row['arousal_pred_1_10']:.2f} / {row['arousal_true_1_10']:.2f}",
        ]
        if has_visibility:
            cells.append(_fmt(row.get(FACE_VISIBILITY_COLUMN), ".1f"))
        body.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    pages = "".join(
        f'<figure><a href="{_href(page)}"><img src="{_href(page)}" loading="lazy" alt="{esc(page)}"></a>'
        f"<figcaption>{esc(page)}</figcaption></figure>"
        for page in files["samples"]
    )
    figures = "".join(
        f'<figure><a href="{_href(files[key])}"><img src="{_href(files[key])}" loading="lazy" alt="{esc(key)}"></a>'
        f"<figcaption>{esc(key.replace('_', ' '))}</figcaption></figure>"
        for key in FIGURE_FILES
        if key in files
    )
    downloads = "".join(
        f'<li><a href="{_href(files[key])}">{esc(files[key])}</a></li>'
        for key in ("per_emotion_csv", "review_csv", "summary")
    )
    document = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>EmoNet review: {esc(Path(summary['test_csv']).name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
.pages figure, .figures figure {{ display: inline-block; width: 48%; margin: 0.5%; vertical-align: top; }}
figcaption {{ font-size: 0.85em; color: #555; }}
.key span {{ font-weight: bold; }}
</style>
</head>
<body>
<h1>EmoNet prediction review</h1>
<table>{metric_rows}</table>
<p class="key">Emotions: <span style="color:{HIT}">correct</span>,
<span style="color:{FALSE_POSITIVE}">false positive</span>, <span style="color:{MISSED}">missed</span>.
Valence and arousal on the 1-10 scale.</p>
<h2>Grid</h2>
<a href="{_href(files['grid'])}"><img src="{_href(files['grid'])}" alt="grid of selected samples"></a>
<h2>Selected samples</h2>
<table>
<tr>{''.join(f'<th>{esc(h)}</th>' for h in header)}</tr>
{''.join(body)}
</table>
<h2>Detailed pages</h2>
<div class="pages">{pages or '<p>none requested</p>'}</div>
<h2>Whole split</h2>
<div class="figures">{figures}</div>
<h2>Files</h2>
<ul>{downloads}</ul>
</body>
</html>
"""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(document)
    return path


# --------------------------------------------------------------------------- main entry


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def review_predictions_with_visualization(
    model: ModelSource,
    test_csv_path: str | Path,
    img_arrays_dir: str | Path,
    output_dir: str | Path,
    num_samples: int = 20,
    detailed_samples: int = 20,
    sort_by: str = "random",
    seed: int = 0,
    *,
    device: str = "auto",
    batch_size: int = 64,
    normalizer: AffectNormalizer | str | Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Predict a labelled split and write a visual review of the model into ``output_dir``.

    Parameters
    ----------
    model : a checkpoint path, an MLflow model URI (``models:/emonet@champion``,
        ``runs:/<run_id>/model``) or a :class:`~emonet.inference.Predictor` (see
        :func:`emonet.batch.load_predictor`). Its per-emotion thresholds decide the
        predicted sets, and its normalizer maps valence/arousal to the 1..10 scale.
    test_csv_path : a split CSV in the archive's format, raw (``annot_arrs_test.csv``)
        or normalized; read with :func:`emonet.data.load_annotations` (rows with
        invalid VAD are dropped and counted). True valence/arousal on [-1, 1] come
        from ``Valence_norm``/``Arousal_norm`` when present, else from the 1..10
        ``Valence``/``Arousal`` through the model's normalizer.
    img_arrays_dir : the archive's ``img_arrs`` folder (crops, and full images for the
        detailed pages; a missing full image only leaves its panel empty).
    output_dir : created if needed and never wiped: files of the same name are
        replaced, others (e.g. pages of an earlier review) stay.
    num_samples : samples selected for the grid and the HTML table, the first of the
        ordering. Larger than the split: capped to the split's size with a logged
        warning. The grid image draws at most the first ``MAX_GRID_SAMPLES`` (100) of
        them; the table lists all.
    detailed_samples : detailed pages, the first of the same ordering (0 for none;
        capped to the split's size).
    sort_by : the ordering (see :func:`rank_samples`): ``"random"`` (seeded),
        ``"best"`` / ``"worst"`` (per-sample F1 of the predicted emotion set, see
        :func:`sample_f1_score`; ties by valence/arousal error, lower ranks better) or
        ``"confidence"`` (mean ``|prob - threshold|``, most confident first).
    seed : seeds the ``"random"`` order.
    device, batch_size, normalizer : for loading ``model`` (ignored for a Predictor).
    progress : tqdm bars over prediction batches and pages.

    Returns
    -------
    pandas.DataFrame
        One row per sample of the split, sorted by ``rank``: ``rank`` (1-based),
        ``selected`` (in the grid), ``detailed`` (has a page), ``csv_row``,
        ``crop_name``, ``arr_name``, ``filename``, ``prob_<Emotion>`` x 26,
        ``pred_emotions`` (by probability) and ``true_emotions`` (``;``-joined),
        ``n_pred``, ``n_true``, ``n_correct``, ``f1``, ``valence_pred``,
        ``arousal_pred``, ``valence_true``, ``arousal_true`` (on [-1, 1]), the same
        four with ``_1_10`` (1..10 scale), ``va_error`` (mean absolute on [-1, 1]),
        ``confidence``, ``Face_Visibility`` when the CSV has it, and
        ``sample_page`` (relative path of the page, or ""). ``df.attrs["summary"]``
        holds the content of ``summary.json``.

    Files written in ``output_dir`` (each atomically): ``grid.png``;
    ``samples/sample_<rank>_<crop stem>.png`` (rank zero-padded);
    ``true_vs_predicted.png``, ``cooccurrence_true.png``, ``cooccurrence_pred.png``,
    ``per_emotion_metrics.png``, ``affect_scatter.png`` and ``per_emotion.csv`` for
    the whole split; ``review.csv`` (the returned table); ``summary.json`` (counts,
    mAP, F1 scores, mean per-sample F1, affect errors, ``sort_by``, ``seed``, files);
    ``index.html``, which shows everything through relative links and opens from
    disk without a server.

    Raises
    ------
    ValueError
        An unknown ``sort_by`` (options listed), ``num_samples < 1``,
        ``detailed_samples < 0``, a malformed CSV or image, or a bad model file.
    FileNotFoundError
        The CSV, the image folder, a crop or the checkpoint is missing.

    Examples
    --------
    >>> table = review_predictions_with_visualization(  # doctest: +SKIP
    ...     "models:/emonet@champion", "data/emotic/annots_arrs/annot_arrs_test.csv",
    ...     "data/emotic/img_arrs", "outputs/review", sort_by="worst")
    >>> table.loc[table["selected"], ["crop_name", "f1", "pred_emotions"]]  # doctest: +SKIP
    """
    _check_sort_by(sort_by)
    for name, value, minimum in (("num_samples", num_samples, 1), ("detailed_samples", detailed_samples, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    test_csv_path, img_dir, output_dir = Path(test_csv_path), Path(img_arrays_dir), Path(output_dir)
    check_not_inputs(
        [output_dir / name for name in (GRID_FILE, SUMMARY_FILE, INDEX_FILE, REVIEW_CSV, *SPLIT_REPORT_FILES.values())],
        {"test_csv_path": test_csv_path, "model": model, "normalizer": normalizer},
    )
    if not img_dir.is_dir():
        raise FileNotFoundError(f"image array folder not found: {img_dir}")
    annotations = load_annotations(test_csv_path)
    n = len(annotations)
    if num_samples > n:
        logger.warning("num_samples=%d exceeds the %d samples of %s; showing all %d", num_samples, n,
                       test_csv_path.name, n)
        num_samples = n
    detailed = min(int(detailed_samples), n)
    if num_samples > MAX_GRID_SAMPLES:
        logger.warning("grid.png shows the first %d of the %d selected samples; index.html lists all",
                       MAX_GRID_SAMPLES, num_samples)

    predictor = load_predictor(model, device=device, batch_size=batch_size, normalizer=normalizer)
    probs, affect_pred = _predict_split(predictor, annotations, img_dir, test_csv_path.name, progress)
    table, y_true, y_pred = _build_table(
        annotations, probs, affect_pred, predictor, sort_by, int(seed), int(num_samples), detailed
    )
    has_visibility = FACE_VISIBILITY_COLUMN in table.columns

    output_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    title = (f"{describe_model(model)} on {test_csv_path.name}: {min(num_samples, MAX_GRID_SAMPLES)} of {n} samples, "
             f"sorted by {sort_by}" + (f" (seed {seed})" if sort_by == "random" else ""))
    _plot_grid(table, img_dir, output_dir / GRID_FILE, title)
    files["grid"] = GRID_FILE

    # Detailed pages, in rank order; only these rows' images are ever read for display.
    low, high = float(min(predictor.normalizer.low)), float(max(predictor.normalizer.high))
    bounds = (min(low, SCALE_MIN), max(high, SCALE_MAX))
    digits = max(3, len(str(detailed)))
    pages = []
    by_rank = table.sort_values("rank")
    for position, row in tqdm(list(by_rank.head(detailed).iterrows()), desc="review: pages", unit="page",
                              disable=not progress, dynamic_ncols=True):
        relative = f"{SAMPLES_DIR}/{_page_name(int(row['rank']), row['crop_name'], digits)}"
        _plot_sample(row, img_dir, annotations.loc[position], predictor.thresholds, bounds, n, sort_by,
                     has_visibility, output_dir / relative)
        table.at[position, "sample_page"] = relative
        pages.append(relative)
    files["samples"] = pages

    # The whole split: the same table and figures as emonet.evaluation, from these predictions.
    true_norm = table.sort_index()[["valence_true", "arousal_true"]].to_numpy()
    _, split_files = write_split_report(y_true, probs, predictor.thresholds, true_norm, affect_pred, output_dir)
    files.update({key: path.name for key, path in split_files.items()})

    try:
        mean_ap = mean_average_precision_score(y_true, probs)
    except ValueError as error:  # no emotion has a positive sample in this split
        logger.warning("mAP undefined on %s: %s", test_csv_path.name, error)
        mean_ap = float("nan")
    scores = multilabel_scores(y_true, y_pred)
    ordered = table.sort_values("rank")
    summary: dict[str, Any] = {
        "model": describe_model(model),
        "test_csv": str(test_csv_path),
        "img_arrays_dir": str(img_dir),
        "n_samples": n,
        "rows_rejected": int(annotations.attrs.get("rejected_rows", 0)),
        "n_selected": int(num_samples),
        "n_detailed": detailed,
        "sort_by": sort_by,
        "seed": int(seed),
        "mAP": _finite_or_none(mean_ap),
        "f1_macro": scores["f1_macro"],
        "f1_micro": scores["f1_micro"],
        "f1_samples": scores["f1_samples"],
        "mean_sample_f1": float(table["f1"].mean()),
        "selected_mean_sample_f1": float(ordered["f1"].head(num_samples).mean()),
        "mae_valence": float(np.abs(table["valence_pred"] - table["valence_true"]).mean()),
        "mae_arousal": float(np.abs(table["arousal_pred"] - table["arousal_true"]).mean()),
        "mae_valence_1_10": float(np.abs(table["valence_pred_1_10"] - table["valence_true_1_10"]).mean()),
        "mae_arousal_1_10": float(np.abs(table["arousal_pred_1_10"] - table["arousal_true_1_10"]).mean()),
        "selected": ordered["crop_name"].head(num_samples).tolist(),
        "files": {**files, "review_csv": REVIEW_CSV, "summary": SUMMARY_FILE, "index": INDEX_FILE},
    }
    write_csv_atomic(ordered, output_dir / REVIEW_CSV)
    write_json_atomic(summary, output_dir / SUMMARY_FILE)
    _write_index(output_dir / INDEX_FILE, summary, table, has_visibility)
    logger.info("review of %d samples (%s) written to %s: mAP %s, mean per-sample F1 %.3f", n, sort_by, output_dir,
                _fmt(mean_ap, ".4f"), summary["mean_sample_f1"])
    ordered = ordered.reset_index(drop=True)
    ordered.attrs["summary"] = summary
    return ordered
