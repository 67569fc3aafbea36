"""Prediction: the :class:`~emonet.inference.predictor.Predictor`, the one prediction loop
(:mod:`~emonet.inference.loop`) on torch or ONNX Runtime (:mod:`~emonet.inference.onnx_runtime`),
loading a model from a checkpoint or MLflow (:mod:`~emonet.inference.loading`), scoring a CSV
(:mod:`~emonet.inference.csv_scoring`) and the MLflow pyfunc model (:mod:`~emonet.inference.pyfunc_model`,
run by MLflow from its file). Imports no training code.

The names below are re-exported lazily (``lazy_loader``): importing one submodule loads
only what it needs.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "csv_scoring": [
            "CONTEXT_PATH",
            "CsvImageReader",
            "ID_COLUMNS",
            "IMAGE_PATH",
            "ON_ERROR_OPTIONS",
            "ROW_COLUMN",
            "predict_csv",
            "skipped_path",
        ],
        "loading": [
            "ModelSource",
            "check_registered_model_uri",
            "describe_model",
            "is_mlflow_uri",
            "load_predictor",
        ],
        "loop": [
            "ImageInputs",
            "Predictions",
            "eval_transform",
            "predict_split",
            "to_device",
        ],
        "onnx_runtime": [
            "PRECISION_KEY",
            "RUNTIMES",
            "OnnxModel",
            "Runtime",
            "onnx_session",
            "resolve_runtime",
        ],
        "predictor": [
            "AFFECT_OUTPUT_COLUMNS",
            "EMOTIONS_COLUMN",
            "OUTPUT_COLUMNS",
            "PROB_COLUMNS",
            "Predictor",
            "prob_column",
        ],
    },
)
