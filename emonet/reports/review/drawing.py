"""The review's figures: the grid of selected crops and one detailed page per sample."""

from __future__ import annotations

import logging
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.offsetbox import AnchoredOffsetbox, HPacker, TextArea, VPacker
from matplotlib.patches import Rectangle

from emonet.data.annotations import scaled_box
from emonet.data.arrays import load_array
from emonet.inference.predictor import PROB_COLUMNS
from emonet.metrics import format_metric
from emonet.schema import EMOTIONS, FACE_VISIBILITY_COLUMN, NUM_EMOTIONS
from emonet.utils.io import save_figure_atomic

logger = logging.getLogger(__name__)

# Colours of the emotion labels, in the grid, the detailed pages and the HTML.
HIT = "#1a9641"  # predicted and true
FALSE_POSITIVE = "#d7191c"  # predicted, not true
MISSED = "#7f7f7f"  # true, not predicted
NEGATIVE = "#d9d9d9"  # neither (probability bars only)

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
        head = TextArea(
            label if i == 0 else " " * len(label),
            textprops={"fontsize": fontsize, "fontweight": "bold", "family": "DejaVu Sans Mono"},
        )
        parts = [TextArea(text, textprops={"fontsize": fontsize, "color": colour}) for text, colour in line]
        rows.append(HPacker(children=[head, *parts], align="baseline", pad=0, sep=3))
    return rows


def emotion_tokens(row: pd.Series) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
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


# --------------------------------------------------------------------------- grid


def _draw_grid_crop(ax: Any, row: pd.Series, img_dir: Path) -> None:
    """A grid cell's crop, framed green when its F1 reaches 0.5 (red otherwise), under its rank and F1."""
    ax.imshow(np.asarray(load_array(img_dir, row["crop_name"])))
    ax.set_xticks([])
    ax.set_yticks([])
    edge = HIT if row["f1"] >= 0.5 else FALSE_POSITIVE
    for spine in ax.spines.values():
        spine.set_edgecolor(edge)
        spine.set_linewidth(2)
    ax.set_title(f"#{row['rank']}  {Path(row['crop_name']).stem}  F1 {row['f1']:.2f}", fontsize=_GRID_FONT + 0.5, pad=3)


def _draw_grid_text(ax: Any, row: pd.Series, width_chars: int) -> None:
    """A grid cell's text under the crop: predicted and true emotions, then valence/arousal."""
    ax.set_axis_off()
    pred_tokens, true_tokens = emotion_tokens(row)
    lines = _token_lines("pred", pred_tokens, width_chars, _GRID_LIST_LINES, _GRID_FONT)
    lines += _token_lines("true", true_tokens, width_chars, _GRID_LIST_LINES, _GRID_FONT)
    affect = (
        f"val {row['valence_pred_1_10']:.1f} (true {row['valence_true_1_10']:.1f})  "
        f"aro {row['arousal_pred_1_10']:.1f} (true {row['arousal_true_1_10']:.1f})"
    )
    lines.append(TextArea(affect, textprops={"fontsize": _GRID_FONT, "color": "black"}))
    box = VPacker(children=lines, align="left", pad=0, sep=2)
    ax.add_artist(
        AnchoredOffsetbox(
            loc="upper left",
            child=box,
            frameon=False,
            pad=0,
            borderpad=0.1,
            bbox_to_anchor=(0.0, 1.0),
            bbox_transform=ax.transAxes,
        )
    )


def _add_grid_key(fig: Figure, y: float) -> None:
    """The colour key of the emotion lists, centred across the figure at height ``y`` (figure fraction)."""
    key = HPacker(
        children=[
            TextArea("emotions:", textprops={"fontsize": 9}),
            TextArea("correct", textprops={"fontsize": 9, "color": HIT, "fontweight": "bold"}),
            TextArea("false positive", textprops={"fontsize": 9, "color": FALSE_POSITIVE, "fontweight": "bold"}),
            TextArea("missed", textprops={"fontsize": 9, "color": MISSED, "fontweight": "bold"}),
            TextArea("|  valence/arousal on the 1-10 scale  |  frame green when F1 >= 0.5", textprops={"fontsize": 9}),
        ],
        align="baseline",
        pad=0,
        sep=6,
    )
    fig.add_artist(
        AnchoredOffsetbox(
            loc="upper center",
            child=key,
            frameon=False,
            pad=0,
            borderpad=0,
            bbox_to_anchor=(0.5, y),
            bbox_transform=fig.transFigure,
        )
    )


def plot_grid(table: pd.DataFrame, img_dir: Path, path: Path, title: str) -> Path:
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
        2 * n_rows,
        n_cols,
        height_ratios=[_GRID_IMAGE_HEIGHT, _GRID_TEXT_HEIGHT] * n_rows,
        left=0.01,
        right=0.99,
        top=top,
        bottom=0.005,
        hspace=0.08,
        wspace=0.06,
    )
    # Characters per text line: cell width in points over an average glyph width.
    width_chars = int(_GRID_CELL_WIDTH * 72 / (_GRID_FONT * 0.6))
    for k, (_, row) in enumerate(selected.iterrows()):
        r, c = divmod(k, n_cols)
        _draw_grid_crop(fig.add_subplot(grid[2 * r, c]), row, img_dir)
        _draw_grid_text(fig.add_subplot(grid[2 * r + 1, c]), row, width_chars)
    fig.suptitle(title, fontsize=12, y=1.0 - 0.25 / (n_rows * cell_height + 0.9), va="top")
    _add_grid_key(fig, 1.0 - 0.55 / (n_rows * cell_height + 0.9))
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
    colours = [HIT if p and t else FALSE_POSITIVE if p else MISSED if t else NEGATIVE for p, t in zip(predicted, truth)]
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
    ax.scatter(
        *pred_xy, s=130, marker="X", color="tab:orange", edgecolor="black", linewidth=0.6, label="predicted", zorder=4
    )
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_aspect("equal")
    ax.set_xlabel("valence (1-10)")
    ax.set_ylabel("arousal (1-10)")
    ax.grid(alpha=0.25)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    ax.set_title("Valence-arousal space", fontsize=11)


def _summary_text(row: pd.Series, n: int, sort_by: str, has_visibility: bool) -> str:
    pred_tokens, true_tokens = emotion_tokens(row)
    correct = [e for e, c in pred_tokens if c == HIT]
    false_pos = [e for e, c in pred_tokens if c == FALSE_POSITIVE]
    missed = [e for e, c in true_tokens if c == MISSED]
    if has_visibility:
        visibility = row.get(FACE_VISIBILITY_COLUMN)
        face = f"{format_metric(visibility, '.1f')} %" if visibility is not None else "n/a"
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


def plot_sample(
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
        ax_full.add_patch(
            Rectangle(
                (left / step, top / step),
                (right - left) / step,
                (bottom - top) / step,
                fill=False,
                edgecolor="yellow",
                linewidth=2.2,
            )
        )
        ax_full.add_patch(
            Rectangle(
                (left / step, top / step),
                (right - left) / step,
                (bottom - top) / step,
                fill=False,
                edgecolor="black",
                linewidth=0.8,
                linestyle="--",
            )
        )
        ax_full.set_title(f"full image {row['arr_name']} with the body box", fontsize=10)
    except (ValueError, FileNotFoundError) as error:
        # The crop alone still makes a useful page.
        logger.debug("no full image for %s: %s", row["crop_name"], error)
        ax_full.text(
            0.5,
            0.5,
            f"full image not available\n({row['arr_name']})",
            ha="center",
            va="center",
            fontsize=10,
            color="0.4",
            transform=ax_full.transAxes,
        )

    ax_bars = fig.add_subplot(grid[:, 1])
    probs = row[list(PROB_COLUMNS)].to_numpy(dtype=np.float64)
    truth = np.array([e in set(str(row["true_emotions"]).split(";")) for e in EMOTIONS])
    _draw_probabilities(ax_bars, probs, truth, thresholds)

    _draw_affect(fig.add_subplot(grid[0, 2]), row, *bounds)
    ax_text = fig.add_subplot(grid[1, 2])
    ax_text.set_axis_off()
    ax_text.text(
        0.0,
        1.0,
        _summary_text(row, n, sort_by, has_visibility),
        transform=ax_text.transAxes,
        va="top",
        ha="left",
        fontsize=9,
        family="DejaVu Sans Mono",
        linespacing=1.35,
    )
    fig.suptitle(
        f"Sample #{row['rank']}: {row['crop_name']}  (F1 {row['f1']:.2f}, VA error {row['va_error']:.2f})", fontsize=13
    )
    return save_figure_atomic(fig, path)


def page_name(rank: int, crop_name: str, digits: int) -> str:
    return f"sample_{rank:0{digits}d}_{Path(crop_name).stem}.png"
