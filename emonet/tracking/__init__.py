"""MLflow: logging runs and the pyfunc model (:mod:`~emonet.tracking.run_logging`) with its ONNX
export checked against torch (:mod:`~emonet.tracking.model_export`), promotion in the
registry (:mod:`~emonet.tracking.registry`), a run's fingerprints and the check that skips a
retraining that would reproduce the champion (:mod:`~emonet.tracking.recipe`), and closing the runs
of killed flows (:mod:`~emonet.tracking.stale_runs`). Imports no training code.

The names below are re-exported lazily (``lazy_loader``): importing one submodule loads
only what it needs.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "model_export": [
            "INT8_EXPORT_TAG",
            "INT8_FILE",
            "Int8Export",
            "ModelExports",
            "ONNX_CHECK_ROWS",
            "ONNX_EXPORT_TAG",
            "ONNX_TOLERANCE",
            "OnnxExport",
            "QUANTIZATIONS",
            "check_export_options",
            "check_inputs",
            "export_checked_onnx",
            "make_exports",
            "quantize_checked_int8",
        ],
        "recipe": [
            "CODE_VERSION_TAG",
            "CONFIG_FINGERPRINT_TAG",
            "DATA_FINGERPRINT_TAG",
            "RECIPE_TAGS",
            "RetrainingDecision",
            "SKIP_REASON_TAG",
            "TRAINING_SKIPPED_TAG",
            "code_version",
            "decide_retraining",
            "recipe_tags",
            "retraining_unneeded",
        ],
        "registry": [
            "CHALLENGER",
            "CHAMPION",
            "DEMO_MODEL_NAME",
            "MODEL_NAME",
            "PROMOTION_SPLITS",
            "PromotionDecision",
            "champion_version",
            "describe_difference",
            "find_run_version",
            "predict_model_on_split",
            "promote_model",
            "recorded_maps",
            "split_score_tag",
        ],
        "run_logging": [
            "configure_mlflow",
            "log_emonet_model",
            "log_metrics",
            "model_signature",
            "pip_requirements",
        ],
        "stale_runs": [
            "END_REASON_TAG",
            "FLOW_RUN_TAG",
            "HOST_TAG",
            "PID_TAG",
            "PROCESS_START_TAG",
            "close_stale_runs",
            "end_open_runs",
            "end_run_with_reason",
            "process_tags",
        ],
    },
)
