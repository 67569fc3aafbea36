"""The review's ``index.html``: metrics, the selected samples and every figure, through
relative links, so it opens from disk (or from MLflow's artifact view) without a server."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from emonet.metrics import VISIBILITY_GROUPS, format_metric
from emonet.metrics.bootstrap import BootstrapInterval
from emonet.reports.review.drawing import FALSE_POSITIVE, HIT, MISSED, emotion_tokens
from emonet.schema import FACE_VISIBILITY_COLUMN
from emonet.utils.io import atomic_open

# Columns of the face-visibility table: metric of emonet.metrics.metrics_by_visibility, format.
VISIBILITY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("n", ".0f"),
    ("mAP", ".4f"),
    ("mAP_voc11", ".4f"),
    ("f1_macro", ".4f"),
    ("mae_valence_1_10", ".2f"),
    ("mae_arousal_1_10", ".2f"),
)

# The whole-split figures of emonet.reports.evaluation, in the order the page shows them.
FIGURE_KEYS: tuple[str, ...] = (
    "true_vs_predicted",
    "cooccurrence_true",
    "cooccurrence_pred",
    "per_emotion_metrics",
    "affect_scatter",
)


def _interval(interval: dict[str, Any] | None) -> str:
    """`` [low, high] (95% bootstrap)`` of a ``summary.json`` interval; empty without one."""
    if not interval:
        return ""
    return f" {BootstrapInterval(**interval).bounds('.4f')} ({100 * interval['confidence']:g}% bootstrap)"


def _href(relative: str) -> str:
    return html.escape(quote(relative), quote=True)


def _emotion_spans(tokens: list[tuple[str, str]]) -> str:
    if not tokens:
        return '<span style="color:#7f7f7f">(none)</span>'
    return ", ".join(f'<span style="color:{c}">{html.escape(e)}</span>' for e, c in tokens)


# The page's style sheet, inlined so index.html stays a single self-contained file.
_STYLE = """body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #ddd; }
.pages figure, .figures figure { display: inline-block; width: 48%; margin: 0.5%; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; }
.key span { font-weight: bold; }"""


def _metric_rows(summary: dict[str, Any]) -> str:
    """The rows of the page's first table: the model, the split, counts and the whole-split metrics."""
    return "".join(
        f"<tr><th>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>"
        for label, value in (
            ("model", summary["model"]),
            ("test CSV", summary["test_csv"]),
            ("samples in split", str(summary["n_samples"])),
            ("rows rejected while loading", str(summary["rows_rejected"])),
            ("rows with masked valence/arousal", str(summary["rows_affect_masked"])),
            (
                "rows in the emotion metrics / affect errors",
                f"{format_metric(summary['n_emotion'], '.0f')} / {format_metric(summary['n_affect'], '.0f')}",
            ),
            ("shown in grid", f"{summary['n_selected']} (sorted by {summary['sort_by']}, seed {summary['seed']})"),
            ("detailed pages", str(summary["n_detailed"])),
            (
                "mAP (scikit-learn AP)",
                format_metric(summary["mAP"], ".4f") + _interval(summary["intervals"].get("mAP")),
            ),
            (
                "mAP_voc11 (the EMOTIC authors' 11-point AP)",
                format_metric(summary["mAP_voc11"], ".4f") + _interval(summary["intervals"].get("mAP_voc11")),
            ),
            (
                "macro F1 / micro F1",
                f"{format_metric(summary['f1_macro'], '.4f')} / {format_metric(summary['f1_micro'], '.4f')}",
            ),
            ("mean per-sample F1", format_metric(summary["mean_sample_f1"], ".4f")),
            (
                "valence / arousal MAE (1-10)",
                f"{format_metric(summary['mae_valence_1_10'], '.2f')} / "
                f"{format_metric(summary['mae_arousal_1_10'], '.2f')}",
            ),
        )
    )


def _visibility_section(by_visibility: dict[str, float]) -> str:
    """The "By face visibility" heading and table; empty when the split has no visibility scores."""
    if not by_visibility:
        return ""
    rows = "".join(
        f"<tr><th>{html.escape(group)}</th>"
        + "".join(
            f"<td>{format_metric(by_visibility.get(f'{metric}_face_{group}'), spec)}</td>"
            for metric, spec in VISIBILITY_COLUMNS
        )
        + "</tr>"
        for group in VISIBILITY_GROUPS
    )
    return (
        "<h2>By face visibility</h2><table><tr><th>face</th>"
        + "".join(f"<th>{html.escape(metric)}</th>" for metric, _ in VISIBILITY_COLUMNS)
        + f"</tr>{rows}</table>"
    )


def _sample_row(row: pd.Series, has_visibility: bool) -> str:
    """One selected sample's table row; its crop links to its detailed page, when it has one."""
    pred_tokens, true_tokens = emotion_tokens(row)
    crop = html.escape(str(row["crop_name"]))
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
        cells.append(format_metric(row.get(FACE_VISIBILITY_COLUMN), ".1f"))
    return "<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def _samples_table(table: pd.DataFrame, has_visibility: bool) -> str:
    """The "Selected samples" table, in rank order, with its header row."""
    header = ["rank", "crop", "F1", "predicted", "true", "valence pred / true", "arousal pred / true"]
    if has_visibility:
        header.append("face visibility")
    selected = table[table["selected"]].sort_values("rank")
    body = "".join(_sample_row(row, has_visibility) for _, row in selected.iterrows())
    return f"""<table>
<tr>{"".join(f"<th>{html.escape(h)}</th>" for h in header)}</tr>
{body}
</table>"""


def _detailed_pages(files: dict[str, Any]) -> str:
    """The detailed pages as linked thumbnails, or a note that none was requested."""
    pages = "".join(
        f'<figure><a href="{_href(page)}"><img src="{_href(page)}" loading="lazy" alt="{html.escape(page)}"></a>'
        f"<figcaption>{html.escape(page)}</figcaption></figure>"
        for page in files["samples"]
    )
    return pages or "<p>none requested</p>"


def _split_figures(files: dict[str, Any]) -> str:
    """The whole-split figures that were written, in :data:`FIGURE_KEYS` order, as linked thumbnails."""
    return "".join(
        f'<figure><a href="{_href(files[key])}"><img src="{_href(files[key])}" loading="lazy" '
        f'alt="{html.escape(key)}"></a>'
        f"<figcaption>{html.escape(key.replace('_', ' '))}</figcaption></figure>"
        for key in FIGURE_KEYS
        if key in files
    )


def _downloads(files: dict[str, Any]) -> str:
    """List items linking the review's tables: per-emotion CSV, review CSV and summary."""
    return "".join(
        f'<li><a href="{_href(files[key])}">{html.escape(files[key])}</a></li>'
        for key in ("per_emotion_csv", "review_csv", "summary")
    )


def write_index(path: Path, summary: dict[str, Any], table: pd.DataFrame, has_visibility: bool) -> Path:
    """Write the review's ``index.html`` at ``path`` (atomically) and return ``path``.

    ``summary`` is the review's ``summary.json`` content (its ``files`` relative to the
    page); ``table`` the review table, whose selected rows are listed; ``has_visibility``
    adds their face-visibility column.
    """
    files = summary["files"]
    document = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>EmoNet review: {html.escape(Path(summary["test_csv"]).name)}</title>
<style>
{_STYLE}
</style>
</head>
<body>
<h1>EmoNet prediction review</h1>
<table>{_metric_rows(summary)}</table>
<p class="key">Emotions: <span style="color:{HIT}">correct</span>,
<span style="color:{FALSE_POSITIVE}">false positive</span>, <span style="color:{MISSED}">missed</span>.
Valence and arousal on the 1-10 scale.</p>
{_visibility_section(summary["by_face_visibility"])}
<h2>Grid</h2>
<a href="{_href(files["grid"])}"><img src="{_href(files["grid"])}" alt="grid of selected samples"></a>
<h2>Selected samples</h2>
{_samples_table(table, has_visibility)}
<h2>Detailed pages</h2>
<div class="pages">{_detailed_pages(files)}</div>
<h2>Whole split</h2>
<div class="figures">{_split_figures(files)}</div>
<h2>Files</h2>
<ul>{_downloads(files)}</ul>
</body>
</html>
"""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(document)
    return path
