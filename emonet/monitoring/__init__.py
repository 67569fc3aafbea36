"""Watching a registered model in use: a batch of new crops against the version's reference.

The signals of a crop (:mod:`~emonet.monitoring.signals`), reading a batch
(:mod:`~emonet.monitoring.batches`), one pass through the model
(:mod:`~emonet.monitoring.scoring`), the version's reference (:mod:`~emonet.monitoring.reference`),
the tests and the decision (:mod:`~emonet.monitoring.drift`), the HTML report and markdown
table (:mod:`~emonet.monitoring.report`), a monitoring run in MLflow
(:mod:`~emonet.monitoring.monitor`) and the demo's two batches (:mod:`~emonet.monitoring.demo`).
Imports no training code.

The names below are re-exported lazily (``lazy_loader``): importing one submodule loads
only what it needs.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "batches": ["IMAGE_SUFFIXES", "MonitoringBatch", "open_batch"],
        "demo": ["write_demo_batches"],
        "drift": [
            "DEFAULT_FALSE_ALARM_RATE",
            "EMBEDDING_SIGNAL",
            "DriftReport",
            "PerformanceCheck",
            "SignalResult",
            "check_performance",
            "chi2_homogeneity_test",
            "detect_drift",
            "embedding_drift",
            "ks_test",
        ],
        "monitor": [
            "DEFAULT_MODEL_URI",
            "MONITORING_EXPERIMENT",
            "MonitoringResult",
            "TAG_DRIFT",
            "TAG_PERFORMANCE",
            "load_monitoring_predictor",
            "monitor_batch",
            "resolve_model_version",
        ],
        "reference": [
            "REFERENCE_ARTIFACT",
            "REFERENCE_ROWS",
            "REFERENCE_TAG",
            "Reference",
            "build_reference",
            "ensure_reference",
            "load_reference",
            "reference_split",
            "save_reference",
        ],
        "report": ["CHI2_TEST_NAME", "evidently_drift_values", "markdown_summary", "write_html_report"],
        "scoring": ["ScoredBatch", "score_batch"],
        "signals": ["FACE_CLASSES", "SIGNALS", "Signal", "face_classes", "image_signals", "signal_table"],
    },
)
