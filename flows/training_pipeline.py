"""The main job: data preparation, training, evaluation and model registration as one
Prefect flow, tracked in one MLflow run.

Run it on the demo data with ``make demo`` (or ``python -m flows.training_pipeline``);
deployments in ``prefect.yaml`` schedule it and expose its parameters in the UI.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import mlflow
import pandas as pd
from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from emonet.config import Backbone, Variant
from emonet.schema import SPLITS, annotations_path, arrays_dir
from emonet.tracking import configure_mlflow
from tasks.data import (
    ensure_demo_data,
    normalize_splits,
    score_visibility_shard,
    shard_bounds,
    write_normalized_splits,
    write_visibility,
)
from tasks.model import (
    evaluate_model,
    finish_mlflow_run,
    log_dataset_summary,
    register_model,
    review_model,
    start_mlflow_run,
    train_model,
)

PositiveInt = Annotated[int, Field(ge=1)]


@flow(name="emonet-prepare-data")
def prepare_data(
    data_root: Path,
    output_dir: Path,
    min_face_visibility: float | None = None,
    fit_normalization_on_train: bool = False,
    visibility_shard_size: PositiveInt = 2000,
    visibility_workers: PositiveInt | None = None,
    visibility_parallel_shards: PositiveInt = 1,
) -> dict[str, Any]:
    """Face visibility (cached per shard) and affect normalization (cached) of every split.

    Writes ``<output_dir>/visibility/`` (CSV copies with ``Face_Visibility`` and
    histograms) and ``<output_dir>/normalized/`` (``normalized_dataset_<split>.csv``,
    ``normalization.json``); returns their paths, the normalized frames and row counts.
    """
    img_dir = arrays_dir(data_root)
    shards = []
    for split in SPLITS:
        csv_path = annotations_path(data_root, split)
        n_rows = len(pd.read_csv(csv_path, usecols=["Crop_name"]))
        shards += [(split, csv_path, start, stop) for start, stop in shard_bounds(n_rows, visibility_shard_size)]
    # Each shard already uses `visibility_workers` processes: run `parallel_shards` at a
    # time so the machine is not oversubscribed (on a cluster runner, raise it).
    scores: dict[str, list[float]] = {split: [] for split in SPLITS}
    for wave_start in range(0, len(shards), visibility_parallel_shards):
        wave = shards[wave_start : wave_start + visibility_parallel_shards]
        futures = [
            score_visibility_shard.submit(csv_path, img_dir, start, stop, visibility_workers)
            for _, csv_path, start, stop in wave
        ]
        for (split, *_), future in zip(wave, futures):
            scores[split] += future.result()

    visibility_dir = output_dir / "visibility"
    visibility = write_visibility({split: annotations_path(data_root, split) for split in SPLITS}, scores, visibility_dir)
    csv_paths = {split: visibility_dir / annotations_path(data_root, split).name for split in SPLITS}
    frames, normalizer, counts = normalize_splits(csv_paths, min_face_visibility, fit_normalization_on_train)
    normalized, normalization_json = write_normalized_splits(frames, normalizer, output_dir / "normalized")
    return {
        "frames": frames,
        "counts": counts,
        "visibility": visibility,
        "visibility_dir": visibility_dir,
        "normalized": normalized,
        "normalization_json": normalization_json,
    }


@flow(name="emonet-training-pipeline", log_prints=True)
def emonet_training_pipeline(
    data_root: Path | None = None,
    demo_dir: Path = Path("data/demo"),
    output_dir: Path = Path("outputs"),
    backbone: Backbone = "resnet18",
    variant: Variant = "body",
    pretrained: bool = False,
    weights_path: Path | None = None,
    image_size: Annotated[int, Field(ge=32)] = 64,
    epochs: PositiveInt = 5,
    batch_size: PositiveInt = 16,
    learning_rate: Annotated[float, Field(gt=0)] = 2e-3,
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4,
    emotion_loss_weight: Annotated[float, Field(ge=0)] = 1.0,
    affect_loss_weight: Annotated[float, Field(ge=0)] = 1.0,
    min_face_visibility: Annotated[float, Field(ge=0, le=100)] | None = None,
    fit_normalization_on_train: bool = False,
    seed: int = 0,
    num_workers: Annotated[int, Field(ge=0)] = 2,
    visibility_shard_size: PositiveInt = 2000,
    visibility_workers: PositiveInt | None = None,
    visibility_parallel_shards: PositiveInt = 1,
    experiment_name: str = "emonet",
    registered_model_name: str = "emonet",
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Train EmoNet on an EMOTIC archive (or the bundled demo data) and register it.

    Args:
        data_root: Folder holding `annots_arrs/` and `img_arrs/`; leave empty to use the
            demo data in `demo_dir` (generated when missing).
        demo_dir: Where the demo archive lives or is generated.
        output_dir: Visibility and normalized CSVs, checkpoints and reports go here.
        backbone: torchvision trunk; resnet18 for CPUs, resnet50 as in the EMOTIC seed.
        variant: `body` (one stream on the body crop) or `body_context` (crop + full image).
        pretrained: Start from ImageNet weights (needs internet or `weights_path`).
        weights_path: Local torchvision state_dict for the backbone, for offline machines.
        image_size: Side of the square network input, in pixels.
        epochs: Maximum number of epochs; early stopping may end sooner.
        batch_size: Images per optimizer step.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        emotion_loss_weight: Weight of the asymmetric emotion loss.
        affect_loss_weight: Weight of the valence/arousal Smooth L1 loss.
        min_face_visibility: Keep only rows whose face visibility is at least this (0-100).
        fit_normalization_on_train: Fit valence/arousal bounds on train instead of 1..10.
        seed: Seeds data order, augmentation and initialization.
        num_workers: DataLoader worker processes.
        visibility_shard_size: Rows per cached face-visibility shard.
        visibility_workers: Face Mesh processes per shard (default: all cores).
        visibility_parallel_shards: Shards scored at the same time.
        experiment_name: MLflow experiment.
        registered_model_name: MLflow registered model that receives the new version.
        tracking_uri: MLflow tracking URI; default `MLFLOW_TRACKING_URI` or SQLite under `mlruns/`.
    """
    logger = get_run_logger()
    output_dir = output_dir.resolve()
    root = (data_root or ensure_demo_data(demo_dir, seed=seed)).resolve()
    img_dir = arrays_dir(root)
    for split in SPLITS:
        if not annotations_path(root, split).is_file():
            raise FileNotFoundError(f"{annotations_path(root, split)} is missing: is {root} an EMOTIC archive root?")

    experiment_id = configure_mlflow(tracking_uri=tracking_uri, experiment_name=experiment_name)
    run_id = start_mlflow_run(experiment_id, flow_run.id, flow_run.name, {**flow_run.parameters, "data_root": root})
    try:
        data = prepare_data(
            root,
            output_dir,
            min_face_visibility,
            fit_normalization_on_train,
            visibility_shard_size,
            visibility_workers,
            visibility_parallel_shards,
        )
        normalized, normalization_json = data["normalized"], data["normalization_json"]
        log_dataset_summary(run_id, data["frames"], data["counts"], data["visibility"], data["visibility_dir"])

        run_dir = output_dir / "runs" / run_id
        training = train_model(
            run_id,
            normalized["train"],
            normalized["val"],
            img_dir,
            run_dir / "checkpoints",
            normalization_json,
            model={"backbone": backbone, "variant": variant, "pretrained": pretrained, "weights_path": weights_path},
            loss={"emotion_weight": emotion_loss_weight, "affect_weight": affect_loss_weight},
            train={
                "image_size": image_size,
                "context_size": image_size,
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": learning_rate,
                "weight_decay": weight_decay,
                "num_workers": num_workers,
                "seed": seed,
            },
        )
        evaluation = evaluate_model(
            run_id, training["best_checkpoint"], normalized["test"], img_dir, normalization_json, run_dir / "evaluation"
        )
        review_index = review_model(
            run_id, training["best_checkpoint"], normalized["test"], img_dir, normalization_json, run_dir / "review"
        )
        registration = register_model(
            run_id,
            training["best_checkpoint"],
            normalization_json,
            evaluation["metrics"]["mAP"],
            evaluation["test_split"],
            registered_model_name,
        )
    except BaseException:
        finish_mlflow_run(run_id, "FAILED")
        raise
    finish_mlflow_run(run_id, "FINISHED")
    summary = {
        "mlflow_run_id": run_id,
        "test_mAP": evaluation["metrics"]["mAP"],
        "test_metrics": evaluation["metrics"],
        "registered_model": registered_model_name,
        "version": registration["version"],
        "alias": registration["alias"],
        "decision": registration["decision"],
        "output_dir": str(output_dir),
        "review": str(review_index),
        "tracking_uri": mlflow.get_tracking_uri(),
    }
    logger.info("Test mAP %.4f; %s version %s is %s", summary["test_mAP"], registered_model_name, summary["version"], summary["alias"])
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the flow once in this process (ephemeral Prefect) and print where to look."""
    parser = argparse.ArgumentParser(description="Run the EmoNet training pipeline once.")
    parser.add_argument("--data-root", type=Path, default=None, help="EMOTIC archive root (default: demo data)")
    parser.add_argument("--demo-dir", type=Path, default=Path("data/demo"))
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"))
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args(argv)
    overrides = {"epochs": args.epochs} if args.epochs else {}
    summary = emonet_training_pipeline(
        data_root=args.data_root, demo_dir=args.demo_dir, output_dir=args.output_dir, **overrides
    )
    name = summary["registered_model"]
    print(
        f"\nTest mAP: {summary['test_mAP']:.4f}  (macro F1 {summary['test_metrics']['f1_macro']:.4f}, "
        f"MAE valence {summary['test_metrics']['mae_valence_1_10']:.3f} / arousal "
        f"{summary['test_metrics']['mae_arousal_1_10']:.3f} on the 1..10 scale)\n"
        f"Registered: models:/{name} version {summary['version']} -> alias '{summary['alias']}' ({summary['decision']})\n"
        f"Outputs: {summary['output_dir']}\n"
        f"Prediction review (open in a browser): {summary['review']}\n"
        f"MLflow UI: make ui  (or: mlflow ui --backend-store-uri sqlite:///$PWD/mlruns/mlflow.db), then open http://127.0.0.1:5000\n"
        f"Load the model:\n"
        f"    import mlflow, pandas as pd\n"
        f"    mlflow.set_tracking_uri('{summary['tracking_uri']}')\n"
        f"    model = mlflow.pyfunc.load_model('models:/{name}@champion')\n"
        f"    model.predict(pd.DataFrame({{'image_path': ['crop.npy']}}))"
    )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
