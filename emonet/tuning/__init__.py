"""Sweeps over the recipe: search spaces over the config (:mod:`~emonet.tuning.space`) and
Optuna studies whose trials train through ``fit``, tracked in MLflow
(:mod:`~emonet.tuning.study`). Above the training layer; imports no Prefect.

The names below are re-exported lazily (``lazy_loader``): importing one submodule loads
only what it needs.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "space": [
            "Param",
            "SearchSpace",
            "apply_params",
            "load_search_space",
        ],
        "study": [
            "DEFAULT_EXPERIMENT",
            "PRUNERS",
            "STORAGE_ENV",
            "SweepData",
            "TuneResult",
            "default_storage_url",
            "describe_result",
            "make_pruner",
            "open_storage",
            "open_study",
            "prepare_sweep_data",
            "tune",
        ],
    },
)
