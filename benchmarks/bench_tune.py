"""What a sweep costs beyond its training, and what pruning saves.

1. **Overhead.** An Optuna study (``emonet.tuning.study.tune``, pruning off, one worker)
   of ``--n-trials`` trials on a demo archive, against plain ``train_from_csvs`` calls of
   the same trials' configs (the parameters the study drew), in the same process, after
   one untimed warm-up fit. The study's cost beyond training is its storage, the MLflow
   parent and child runs, the per-epoch reports, the plots and ``best_config.yaml``.
   Reported: the study's wall time per trial over the plain fits' (target: <= 1.1), and
   each trial's own time (Optuna's start to end) over its plain fit's.
2. **Pruning.** The same study with the median pruner (same seed, same space, same
   number of trials): the share of the epoch budget it did not train, its wall time,
   and the best validation mAP with and without pruning (information: on a small study
   the sampler's draws differ once a trial is pruned, so the two best values differ by
   more than the pruning alone).

    python benchmarks/bench_tune.py [--search configs/search/demo.yaml] [--n-trials 8] [--epochs 3]
        [--n-train 400] [--image-size 64]

The config is ``configs/demo.yaml`` with ``--epochs`` epochs, on a demo archive of
``--n-train`` train and 100 validation rows (seed 0); the test split is not made.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from emonet.config import load_config
from emonet.data.demo import make_demo_data
from emonet.training.trainer import train_from_csvs
from emonet.tuning.space import apply_params, load_search_space
from emonet.tuning.study import prepare_sweep_data, tune

REPO = Path(__file__).resolve().parents[1]


def _study(space, data, config, tmp: Path, name: str, n_trials: int, pruner: str):
    """One study in its own stores; returns its result, wall time and finished trials."""
    start = time.perf_counter()
    result = tune(
        space,
        data,
        n_trials=n_trials,
        study_name=name,
        out_dir=tmp / name,
        storage=f"sqlite:///{tmp / f'{name}.db'}",
        config=config,
        pruner=pruner,
        seed=0,
        tracking_uri=f"sqlite:///{tmp / f'{name}-mlflow.db'}",
    )
    elapsed = time.perf_counter() - start
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp / f'{name}.db'}").get_trials(
        states=(TrialState.COMPLETE, TrialState.PRUNED)
    )
    return result, elapsed, trials


def _fit_seconds(data, config) -> float:
    start = time.perf_counter()
    train_from_csvs(data.train_csv, data.val_csv, data.img_dir, config, progress=False)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search", type=Path, default=REPO / "configs" / "search" / "demo.yaml")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--n-trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial")
    parser.add_argument("--n-train", type=int, default=400, help="rows of the demo train split")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--skip-pruning", action="store_true", help="measure the overhead only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", module="sklearn")  # emotions without validation positives
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    config = load_config(
        args.config,
        train={"epochs": args.epochs, "image_size": args.image_size, "context_size": args.image_size},
    )
    space = load_search_space(args.search, config)
    with tempfile.TemporaryDirectory(prefix="emonet_bench_tune_") as folder:
        tmp = Path(folder)
        root = make_demo_data(tmp / "demo", seed=0, n_train=args.n_train, n_val=100, n_test=1, size=args.image_size)
        data = prepare_sweep_data(root, tmp / "data")
        print(f"warm-up fit ({args.n_train} rows, {args.epochs} epochs) ...", flush=True)
        _fit_seconds(data, config)

        result, study_s, trials = _study(space, data, config, tmp, "no-pruning", args.n_trials, "none")
        print(f"study without pruning: {study_s:.1f} s for {len(trials)} trials; plain fits of the same configs ...")
        per_trial = []
        fits_s = 0.0
        for trial in trials:
            fit_s = _fit_seconds(data, apply_params(config, trial.params))
            trial_s = (trial.datetime_complete - trial.datetime_start).total_seconds()
            per_trial.append(trial_s / fit_s)
            fits_s += fit_s
            print(f"  trial {trial.number}: {trial_s:.1f} s in the study, {fit_s:.1f} s as a plain fit", flush=True)
        ratio = study_s / fits_s

        if not args.skip_pruning:
            pruned, pruned_s, pruned_trials = _study(space, data, config, tmp, "median", args.n_trials, "median")

    n = len(trials)
    print(
        f"\n{os.cpu_count()} CPUs, load average before start {load_before:.1f}; {args.search.name}, "
        f"{n} trials x {args.epochs} epochs, {args.n_train} train rows at {args.image_size} px"
    )
    print(
        f"overhead: study {study_s / n:.2f} s per trial vs plain fit {fits_s / n:.2f} s: ratio {ratio:.3f} "
        f"(target <= 1.1); per trial (Optuna's start to end / plain fit): median {statistics.median(per_trial):.3f}, "
        f"max {max(per_trial):.3f}"
    )
    if not args.skip_pruning:
        saved = 1 - pruned.epochs_run / pruned.epochs_budget
        print(
            f"pruning (median): {pruned.states.get('PRUNED', 0)} of {len(pruned_trials)} trials pruned, "
            f"{pruned.epochs_run} of {pruned.epochs_budget} epochs trained ({saved:.0%} saved), "
            f"{pruned_s:.1f} s vs {study_s:.1f} s without pruning ({pruned_s / study_s:.2f}x)"
        )
        print(
            f"best validation mAP: {pruned.best_value:.4f} with pruning (trial {pruned.best_trial}), "
            f"{result.best_value:.4f} without (trial {result.best_trial})"
        )
    if load_before > 0.5:
        print("warning: other processes were running; on a busy machine the wall-clock ratio is mostly noise")
    return ratio


if __name__ == "__main__":
    main()
