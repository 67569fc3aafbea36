"""Sweeps as a Prefect flow: an Optuna study over the recipe (``emonet-tune``), and with
``register_best`` the best config trained in full and registered by the training flow.

Run it once with ``python -m flows.tune --search configs/search/demo.yaml --n-trials 12``;
``emonet tune`` runs the same study without Prefect.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Literal

from prefect import flow
from pydantic import PositiveInt

from emonet.config import load_config
from emonet.tuning.space import load_search_space
from emonet.tuning.study import DEFAULT_EXPERIMENT, TuneResult, describe_result
from emonet.utils.reaper import ensure_reaper
from tasks.data import ensure_demo_data
from tasks.tuning import prepare_data, publish_summary, run_sweep


@flow(name="emonet-tune", log_prints=True)
def emonet_tune(
    search: Path = Path("configs/search/demo.yaml"),
    n_trials: PositiveInt = 12,
    study_name: str = "emonet-demo",
    storage: str | None = None,
    config: Path | None = None,
    epochs: PositiveInt | None = None,
    data_root: Path | None = None,
    demo_dir: Path = Path("data/demo"),
    out_dir: Path = Path("outputs/tune"),
    workers: PositiveInt = 1,
    pruner: Literal["median", "hyperband", "none"] = "median",
    seed: int = 0,
    register_best: bool = False,
    registered_model_name: str | None = None,
    experiment_name: str = DEFAULT_EXPERIMENT,
    tracking_uri: str | None = None,
) -> TuneResult:
    """Run (or continue) an Optuna study over the recipe, on validation mAP.

    Args:
        search: Search space YAML: config fields and their distributions
            (`configs/search/demo.yaml`, `configs/search/emotic.yaml`).
        n_trials: Complete or pruned trials the study reaches; a rerun continues it.
        study_name: The study in `storage`; an existing one must have the same space.
        storage: Optuna RDB URL (SQLite, PostgreSQL); empty: `$EMONET_OPTUNA_STORAGE`, else `optuna.db`
            beside the MLflow store.
        config: The recipe the trials vary (a YAML file); empty: the library's defaults.
        epochs: Epochs per trial; empty: the config's.
        data_root: EMOTIC archive root; empty: the demo data in `demo_dir`.
        demo_dir: Where the demo archive lives or is generated.
        out_dir: `best_config.yaml` and the sweep's normalized CSVs go here.
        workers: Processes running trials at once on this machine.
        pruner: `median` (default), `hyperband` or `none`.
        seed: Seed of the TPE sampler (worker k uses seed + k).
        register_best: Train the best config with its full epochs through the training
            flow, which registers it (promotion stays the paired bootstrap on validation).
        registered_model_name: The training flow's `registered_model_name` for `register_best`.
        experiment_name: MLflow experiment of the study's parent and trial runs.
        tracking_uri: MLflow tracking URI; default `MLFLOW_TRACKING_URI` or SQLite under `mlruns/`.
    """
    ensure_reaper()
    base = load_config(config)
    space = load_search_space(search, base)  # refused here, before any data or training
    root = data_root if data_root is not None else ensure_demo_data(demo_dir=demo_dir)
    data = prepare_data(data_root=root, out_dir=out_dir / "data")
    result = run_sweep(
        space=space, data=data, config=base, n_trials=n_trials, study_name=study_name, storage=storage,
        epochs=epochs, pruner=pruner, seed=seed, workers=workers, out_dir=out_dir, tracking_uri=tracking_uri,
        experiment_name=experiment_name,
    )  # fmt: skip
    publish_summary(result)
    if register_best and result.best_config is not None:
        from flows.training_pipeline import emonet_training_pipeline

        emonet_training_pipeline(
            config=result.best_config,
            data_root=data_root,
            demo_dir=demo_dir,
            out_dir=out_dir / "best",
            registered_model_name=registered_model_name,
            tracking_uri=tracking_uri,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the flow once in this process (ephemeral Prefect) and print the study's summary."""
    from emonet.cli import add_tune_arguments

    parser = argparse.ArgumentParser(description="An Optuna sweep over the EmoNet recipe, as a Prefect flow.")
    add_tune_arguments(parser)
    parser.add_argument("--register-best", action="store_true", help="train and register the best config in full")
    parser.add_argument("--registered-model-name", default=None)
    args = parser.parse_args(argv)
    try:  # before Prefect starts: a bad search space is one line, not a traceback
        load_search_space(args.search, load_config(args.config))
    except (ValueError, FileNotFoundError) as error:
        print(f"emonet-tune: error: {error}", file=sys.stderr)
        return 2
    result = emonet_tune(
        search=args.search, n_trials=args.n_trials, study_name=args.study_name, storage=args.storage,
        config=args.config, epochs=args.epochs, data_root=args.data_root, demo_dir=args.demo_dir,
        out_dir=args.out_dir, workers=args.workers, pruner=args.pruner, seed=args.seed,
        register_best=args.register_best, registered_model_name=args.registered_model_name,
        experiment_name=args.experiment, tracking_uri=args.tracking_uri,
    )  # fmt: skip
    print(describe_result(result))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
