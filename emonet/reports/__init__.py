"""What a model's predictions say: a split's evaluation (:mod:`~emonet.reports.evaluation`), the
benchmark table (:mod:`~emonet.reports.benchmark`) and the visual review
(:mod:`~emonet.reports.review`). Imports no training code.

The names below are re-exported lazily (``lazy_loader``): importing one submodule loads
only what it needs.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "benchmark": [
            "BENCHMARK_FILES",
            "BenchmarkTable",
            "NOT_STATED",
            "PROTOCOL_SKLEARN",
            "PROTOCOL_VOC11",
            "PUBLISHED_RESULTS",
            "PublishedResult",
            "TABLE_COLUMNS",
            "benchmark_model",
            "benchmark_table",
            "write_benchmark",
        ],
        "evaluation": [
            "EvaluationReport",
            "SPLIT_REPORT_FILES",
            "SplitPredictions",
            "evaluate_checkpoint",
            "split_fingerprint",
            "write_split_report",
        ],
        "review": [
            "SORT_OPTIONS",
            "rank_samples",
            "review_predictions",
            "review_predictions_with_visualization",
        ],
    },
)
