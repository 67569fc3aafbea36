"""Training: ``fit`` and its loops (:mod:`~emonet.training.fit`), a run's loaders
(:mod:`~emonet.training.run_loaders`), the losses, learning-rate schedules and seeds, resuming from
checkpoints (:mod:`~emonet.training.resume`), the torchrun process group as training sees it
(:mod:`~emonet.training.process_group`) and the torchrun launcher
(:mod:`~emonet.training.launcher`).

The names below are re-exported lazily (``lazy_loader``): importing one submodule loads
only what it needs.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "ddp": [
            "all_gather_objects",
            "all_ranks_finite",
            "all_reduce_sum",
            "broadcast_module",
            "gather_predictions",
            "is_distributed",
            "process_device",
            "process_group",
            "rank",
            "resolve_backend",
            "shard_indices",
            "world_size",
        ],
        "launcher": [
            "launch_training",
            "main",
            "mlflow_epoch_logger",
            "torchrun_command",
        ],
        "losses": [
            "AFFECT_BETA",
            "AsymmetricLoss",
            "EmoNetLoss",
            "LossOutput",
            "REDUCTIONS",
            "masked_affect_loss",
        ],
        "run_loaders": [
            "build_datasets",
            "make_loaders",
        ],
        "run_state": [
            "FitResult",
            "FitState",
            "build_checkpoint",
            "capture_rng",
            "read_best",
            "read_fit_result",
            "restore_rng",
            "resume",
            "save_epoch",
            "save_thresholds",
        ],
        "schedules": [
            "build_scheduler",
        ],
        "seeding": [
            "seed_everything",
            "seed_worker",
            "use_deterministic_algorithms",
        ],
        "trainer": [
            "evaluate",
            "fit",
            "train_from_csvs",
            "train_one_epoch",
        ],
    },
)
