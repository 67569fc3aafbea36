"""Evaluation metrics for multi-label emotions and valence/arousal regression.

Pure functions on NumPy arrays in the style of ``sklearn.metrics``: one shared
validator, ``*_score`` higher-is-better, ``*_error`` lower-is-better. Import them from
here; the private modules group them as scikit-learn's do:

- ``_checks``: the input checks every metric shares (:func:`check_multilabel`);
- ``_ranking``: average precision under both protocols (scikit-learn's step-wise AP,
  the EMOTIC authors' 11-point AP) and the resampling engine of the bootstrap;
- ``_classification``: thresholds, the per-emotion report, F1 and its kin, label-pair
  matrices, per-sample scores;
- ``_regression``: valence/arousal errors;
- ``_summary``: the headline dict of one evaluation, the same per face-visibility group,
  and how a missing metric is written out.
"""

from emonet.metrics._checks import check_multilabel
from emonet.metrics._classification import (
    REPORT_COLUMNS,
    binarize,
    confidence_score,
    cooccurrence_matrix,
    divide_rows,
    multilabel_scores,
    per_emotion_report,
    sample_f1_score,
    true_vs_predicted_matrix,
    tune_thresholds,
)
from emonet.metrics._ranking import (
    mean_average_precision_score,
    mean_voc11_average_precision_score,
    per_label_average_precision,
    resampled_average_precision,
    voc11_average_precision_score,
)
from emonet.metrics._regression import affect_errors, affect_sample_error
from emonet.metrics._summary import (
    EVALUATION_KEYS,
    VISIBILITY_GROUPS,
    VISIBILITY_METRICS,
    evaluate_predictions,
    face_visibility_groups,
    finite_or_none,
    format_metric,
    metrics_by_visibility,
)

__all__ = [
    "EVALUATION_KEYS",
    "REPORT_COLUMNS",
    "VISIBILITY_GROUPS",
    "VISIBILITY_METRICS",
    "affect_errors",
    "affect_sample_error",
    "binarize",
    "check_multilabel",
    "confidence_score",
    "cooccurrence_matrix",
    "divide_rows",
    "evaluate_predictions",
    "face_visibility_groups",
    "finite_or_none",
    "format_metric",
    "mean_average_precision_score",
    "mean_voc11_average_precision_score",
    "metrics_by_visibility",
    "multilabel_scores",
    "per_emotion_report",
    "per_label_average_precision",
    "resampled_average_precision",
    "sample_f1_score",
    "true_vs_predicted_matrix",
    "tune_thresholds",
    "voc11_average_precision_score",
]
