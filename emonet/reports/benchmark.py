"""The EMOTIC benchmark table: a model's per-emotion AP under both AP protocols, both mAPs
and the affect errors with bootstrap intervals, beside published results and their protocol.

:func:`benchmark_table` takes predictions (the training flow has them already);
:func:`benchmark_model` loads a model and predicts a labelled split first, for the
``emonet benchmark`` command.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from emonet.data.annotations import load_annotations, raw_affect
from emonet.data.dataset import EmoticDataset
from emonet.data.normalize import AffectNormalizer
from emonet.inference.loading import ModelSource, describe_model, load_predictor
from emonet.metrics import check_multilabel, format_metric, per_label_average_precision
from emonet.metrics.bootstrap import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    BootstrapInterval,
    bootstrap_intervals,
    check_bootstrap_settings,
)
from emonet.schema import EMOTIONS, NUM_EMOTIONS
from emonet.utils.io import atomic_open, write_csv_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "BENCHMARK_FILES",
    "NOT_STATED",
    "PROTOCOL_SKLEARN",
    "PROTOCOL_VOC11",
    "PUBLISHED_RESULTS",
    "TABLE_COLUMNS",
    "BenchmarkTable",
    "PublishedResult",
    "benchmark_model",
    "benchmark_table",
    "write_benchmark",
]

# The two AP protocols in use on EMOTIC (see emonet.metrics), and the label for a paper
# that does not say which it used.
PROTOCOL_SKLEARN = "scikit-learn AP (step-wise, uninterpolated)"
PROTOCOL_VOC11 = "11-point interpolated AP (the EMOTIC authors' code)"
NOT_STATED = "not stated"
# What write_benchmark writes, by name.
BENCHMARK_FILES: dict[str, str] = {"markdown": "benchmark.md", "csv": "benchmark.csv"}
# Columns of BenchmarkTable.to_frame (the CSV), in order.
TABLE_COLUMNS: tuple[str, ...] = ("section", "name", "metric", "ap_protocol", "value", "low", "high", "unit", "source")
_AFFECT_KEYS = {"mae_valence_1_10": "valence MAE", "mae_arousal_1_10": "arousal MAE"}
_NO_DOMINANCE = "not predicted (the model predicts valence and arousal only)"
_PAPERS_WITH_CODE = "Papers with Code, EMOTIC benchmark (archive: paperswithcode2.com/benchmark/53476)"


@dataclass(frozen=True)
class PublishedResult:
    """One published EMOTIC test result, with the AP protocol behind it and where both come from.

    ``test_map`` is in percent, as papers print it; ``vad_error`` is the mean absolute
    error averaged over valence, arousal and dominance on the 1..10 scale, None when no
    checked source gives it.
    """

    method: str
    test_map: float
    ap_protocol: str  # PROTOCOL_SKLEARN, PROTOCOL_VOC11 or NOT_STATED
    protocol_source: str  # why that protocol: the code that computed it, or what was checked
    source: str  # where the number is printed
    vad_error: float | None = None


# Every number here was read in the named source; a result that could not be sourced is left out.
PUBLISHED_RESULTS: tuple[PublishedResult, ...] = (
    PublishedResult(
        method="Kosti et al., TPAMI 2019: fusion model (body + image CNN)",
        test_map=27.38,
        ap_protocol=PROTOCOL_VOC11,
        protocol_source="the authors' released code: rkosti/emotic src/funcs.lua, precisionrecallvector "
        "(recallstep 0.1), called by CurveEvaluation in train_test.lua",
        source="Kosti, Alvarez, Recasens, Lapedriza, 'Context Based Emotion Recognition using EMOTIC Dataset', "
        f"IEEE TPAMI 2019, arXiv:2003.13401; as listed by {_PAPERS_WITH_CODE} ('Fusion Model')",
    ),
    PublishedResult(
        method="Tandon-A, PyTorch re-implementation of Kosti et al.",
        test_map=25.27,
        ap_protocol=PROTOCOL_SKLEARN,
        protocol_source="github.com/Tandon-A/emotic test.py, test_scikit_ap: sklearn average_precision_score",
        source="github.com/Tandon-A/emotic Colab_train_emotic.ipynb (commit 862a1ca), test output "
        "'Mean average precision=0.2527 Mean VAD MAE=0.9582' (valence 0.900, arousal 1.031, dominance 0.944)",
        vad_error=0.958,
    ),
    PublishedResult(
        method="EmotiCon (Mittal et al., CVPR 2020), depth-based",
        test_map=35.48,
        ap_protocol=NOT_STATED,
        protocol_source="checked: the abstract (arXiv:2003.06692) and the Papers with Code entry",
        source="Mittal, Guhan, Bhattacharya, Chandra, Bera, Manocha, 'EmotiCon: Context-Aware Multimodal Emotion "
        "Recognition using Frege's Principle', CVPR 2020, arXiv:2003.06692 (abstract)",
    ),
    PublishedResult(
        method="EmotiCon (Mittal et al., CVPR 2020), GCN",
        test_map=32.03,
        ap_protocol=NOT_STATED,
        protocol_source="checked: the Papers with Code entry",
        source=f"Mittal et al., CVPR 2020, arXiv:2003.06692; as listed by {_PAPERS_WITH_CODE}",
    ),
    PublishedResult(
        method="EmotionCLIP (Zhang et al., CVPR 2023), linear probe",
        test_map=32.91,
        ap_protocol=PROTOCOL_SKLEARN,
        protocol_source="github.com/Xeaver/EmotionCLIP linear_eval.py: "
        "average_precision_score(y_test, p_test, average='macro')",
        source="Zhang, Pan, Wang, 'Learning Emotion Representations from Verbal and Nonverbal Communication', "
        f"CVPR 2023, arXiv:2305.13500; as listed by {_PAPERS_WITH_CODE}",
    ),
    PublishedResult(
        method="Xenos et al., 2024: VLLM descriptions + vision transformer",
        test_map=38.52,
        ap_protocol=NOT_STATED,
        protocol_source="checked: the Papers with Code entry and github.com/NickyFot/EmoCommonSense, "
        "whose copy checked holds no evaluation code",
        source="Xenos, Foteinopoulou, Ntinou, Patras, Tzimiropoulos, 'VLLMs Provide Better Context for Emotion "
        f"Understanding Through Common Sense Reasoning', arXiv:2404.07078; as listed by {_PAPERS_WITH_CODE}",
    ),
)


@dataclass(frozen=True, eq=False)
class BenchmarkTable:
    """A model's benchmark numbers and the published rows to read them against.

    ``per_emotion`` is indexed by emotion in the paper's order (``schema.EMOTIONS``) with
    columns ``support`` (positive rows), ``average_precision`` (scikit-learn) and
    ``average_precision_voc11`` (11-point), on a 0-1 scale, NaN without a positive.
    ``intervals`` holds ``mAP``, ``mAP_voc11`` and, when affect was given,
    ``mae_valence_1_10`` and ``mae_arousal_1_10`` (see :func:`emonet.metrics.bootstrap.bootstrap_intervals`).
    """

    model: str
    n_rows: int
    per_emotion: pd.DataFrame
    intervals: dict[str, BootstrapInterval]
    published: tuple[PublishedResult, ...] = field(default=PUBLISHED_RESULTS)

    def to_frame(self) -> pd.DataFrame:
        """The table as long rows (the CSV): AP and mAP in percent, affect errors on the 1..10 scale.

        Columns ``TABLE_COLUMNS``; ``section`` is ``model``, ``published`` or ``emotion``.
        """
        rows = []
        for key, protocol in (("mAP", PROTOCOL_SKLEARN), ("mAP_voc11", PROTOCOL_VOC11)):
            interval = self.intervals[key]
            rows.append(
                (
                    "model",
                    self.model,
                    "mAP",
                    protocol,
                    100 * interval.estimate,
                    100 * interval.low,
                    100 * interval.high,
                    "percent",
                    "",
                )
            )
        for key, metric in _AFFECT_KEYS.items():
            if key in self.intervals:
                interval = self.intervals[key]
                rows.append(
                    ("model", self.model, metric, "", interval.estimate, interval.low, interval.high, "1..10 scale", "")
                )
        rows.append(("model", self.model, "dominance MAE", "", math.nan, math.nan, math.nan, _NO_DOMINANCE, ""))
        for result in self.published:
            rows.append(
                (
                    "published",
                    result.method,
                    "mAP",
                    result.ap_protocol,
                    result.test_map,
                    math.nan,
                    math.nan,
                    "percent",
                    f"{result.source}. Protocol: {result.protocol_source}",
                )
            )
            if result.vad_error is not None:
                rows.append(
                    (
                        "published",
                        result.method,
                        "VAD MAE",
                        "",
                        result.vad_error,
                        math.nan,
                        math.nan,
                        "1..10 scale, mean of valence, arousal, dominance",
                        result.source,
                    )
                )
        for emotion, values in self.per_emotion.iterrows():
            rows.append(("emotion", emotion, "support", "", float(values["support"]), math.nan, math.nan, "rows", ""))
            for column, protocol in (
                ("average_precision", PROTOCOL_SKLEARN),
                ("average_precision_voc11", PROTOCOL_VOC11),
            ):
                rows.append(
                    ("emotion", emotion, "AP", protocol, 100 * values[column], math.nan, math.nan, "percent", "")
                )
        return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))

    def to_markdown(self) -> str:
        """The table as Markdown: the model's headline row, the published rows, then each emotion."""
        first = self.intervals["mAP"]
        lines = [
            f"## EMOTIC benchmark: {self.model}",
            "",
            f"{self.n_rows:,} test rows. mAP is the mean AP over the emotions with a positive row, in percent; "
            "the affect errors are mean absolute errors on the 1..10 scale. "
            f"Intervals: {_percent(first.confidence)} percentile bootstrap over the rows "
            f"({first.n_resamples:,} resamples, seed {first.seed}).",
            "",
            f"| model | mAP, {PROTOCOL_SKLEARN} | mAP, {PROTOCOL_VOC11} | valence MAE | arousal MAE | dominance MAE |",
            "| --- | --- | --- | --- | --- | --- |",
            "| "
            + " | ".join(
                [
                    self.model,
                    self.intervals["mAP"].describe(".2f", scale=100),
                    self.intervals["mAP_voc11"].describe(".2f", scale=100),
                    *(
                        self.intervals[key].describe(".2f") if key in self.intervals else "not given"
                        for key in _AFFECT_KEYS
                    ),
                    _NO_DOMINANCE,
                ]
            )
            + " |",
            "",
            "### Published test results",
            "",
            'Compare a published mAP with the mAP of the same protocol above; a paper\'s "not stated" '
            "protocol cannot be matched. VAD MAE: the mean of the valence, arousal and dominance errors "
            '(1..10); "-": no checked source gives it.',
            "",
            "| method | test mAP | AP protocol | VAD MAE | source | protocol from |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for result in self.published:
            vad = f"{result.vad_error:.3f}" if result.vad_error is not None else "-"
            lines.append(
                f"| {result.method} | {result.test_map:.2f} | {result.ap_protocol} | {vad} | "
                f"{result.source} | {result.protocol_source} |"
            )
        lines += [
            "",
            "### Per emotion (the paper's order)",
            "",
            f"| emotion | support | AP, {PROTOCOL_SKLEARN} | AP, {PROTOCOL_VOC11} |",
            "| --- | ---: | ---: | ---: |",
        ]
        for emotion, values in self.per_emotion.iterrows():
            step, voc11 = (
                format_metric(100 * values[column], ".2f")
                for column in ("average_precision", "average_precision_voc11")
            )
            lines.append(f"| {emotion} | {int(values['support'])} | {step} | {voc11} |")
        return "\n".join(lines) + "\n"


def _percent(confidence: float) -> str:
    return f"{100 * confidence:g}%"


def benchmark_table(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    affect_true: ArrayLike | None = None,
    affect_pred: ArrayLike | None = None,
    *,
    model: str = "this model",
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> BenchmarkTable:
    """The benchmark table of a model's predictions on a labelled split.

    Parameters
    ----------
    y_true : array-like of shape (n_samples, 26)
        Multi-hot emotion labels, columns in ``schema.EMOTIONS`` order.
    y_prob : array-like of shape (n_samples, 26)
        Predicted probabilities, same order.
    affect_true, affect_pred : array-like of shape (n_samples, 2), optional
        Annotated (NaN where masked) and predicted (valence, arousal) on the 1..10 scale;
        both or neither.
    model : str, default="this model"
        The name the table gives the model.
    n_resamples, confidence, seed
        Of the bootstrap, see :func:`emonet.metrics.bootstrap.bootstrap_intervals`.

    Returns
    -------
    BenchmarkTable

    Raises
    ------
    ValueError
        Not 26 label columns, or inputs that fail the metrics' checks.
    """
    y_true, y_prob = check_multilabel(y_true, y_prob, name="y_prob", n_labels=NUM_EMOTIONS)
    intervals = bootstrap_intervals(
        y_true, y_prob, affect_true, affect_pred, n_resamples=n_resamples, confidence=confidence, seed=seed
    )
    support = y_true.sum(axis=0)
    step, voc11 = per_label_average_precision(y_true, y_prob)  # the bootstrap has warned about labels without AP
    per_emotion = pd.DataFrame(
        {"support": support.astype(np.int64), "average_precision": step, "average_precision_voc11": voc11},
        index=pd.Index(EMOTIONS, name="emotion"),
    )
    return BenchmarkTable(model=model, n_rows=int(y_true.shape[0]), per_emotion=per_emotion, intervals=intervals)


def write_benchmark(table: BenchmarkTable, out_dir: str | Path) -> dict[str, Path]:
    """Write ``benchmark.md`` and ``benchmark.csv`` into ``out_dir``, each atomically.

    Returns the written paths by the names of ``BENCHMARK_FILES``.
    """
    out_dir = Path(out_dir)
    paths = {name: out_dir / filename for name, filename in BENCHMARK_FILES.items()}
    with atomic_open(paths["markdown"], "w", encoding="utf-8") as handle:
        handle.write(table.to_markdown())
    write_csv_atomic(table.to_frame(), paths["csv"])
    return paths


def benchmark_model(
    model: ModelSource,
    annotations: str | Path,
    img_dir: str | Path,
    *,
    normalizer: AffectNormalizer | str | Path | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> BenchmarkTable:
    """Predict a labelled split with a model and build its benchmark table.

    The model goes through the one prediction path (:func:`emonet.inference.loading.load_predictor`,
    :meth:`~emonet.inference.predictor.Predictor.predict` on an :class:`~emonet.data.dataset.EmoticDataset`);
    its valence and arousal are mapped back to the 1..10 scale with the model's own
    normalizer and measured against the annotated values.

    Parameters
    ----------
    model : a checkpoint path, an MLflow model URI (``models:/emonet@champion``) or a
        :class:`~emonet.inference.predictor.Predictor`.
    annotations : the split's CSV in the archive's layout (the EMOTIC test split for
        numbers comparable with the published ones).
    img_dir : the archive's ``img_arrs`` folder.
    normalizer, batch_size, device : see :func:`emonet.inference.loading.load_predictor`.
    n_resamples, confidence, seed : of the bootstrap.

    Raises
    ------
    FileNotFoundError
        A missing CSV, image folder or checkpoint.
    ValueError
        Bad bootstrap settings, a CSV without the archive's columns, or a file that is
        not an EmoNet model.
    """
    # Settings and the CSV first: a mistake there should not wait for a model to load and predict.
    check_bootstrap_settings(n_resamples, confidence)
    frame = load_annotations(annotations)
    predictor = load_predictor(model, device=device, batch_size=batch_size, normalizer=normalizer)
    dataset = EmoticDataset(frame, img_dir, predictor.transform, with_context=predictor.needs_context)
    predictions = predictor.predict(dataset, progress=True, desc="benchmark")
    split = frame.iloc[predictions.indices]
    table = benchmark_table(
        predictions.emotions_true,
        predictions.emotion_prob,
        raw_affect(split),
        predictor.normalizer.inverse_transform(predictions.affect_pred),
        model=describe_model(model),
        n_resamples=n_resamples,
        confidence=confidence,
        seed=seed,
    )
    logger.info(
        "benchmark of %s on %s (%d rows): mAP %.4f, mAP_voc11 %.4f",
        table.model,
        annotations,
        table.n_rows,
        table.intervals["mAP"].estimate,
        table.intervals["mAP_voc11"].estimate,
    )
    return table
