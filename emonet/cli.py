"""The ``emonet`` command line: each sub-command is a thin layer over a library function.

Each sub-command imports its library module when it runs: the torch-free steps start in
about 0.6 s, where importing the training code (torch, torchvision) takes about 4.7 s.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from emonet.data.images import DEFAULT_MAX_PIXELS
from emonet.utils.io import check_not_inputs, ensure_writable_dir
from emonet.utils.stopping import TrainingStopped

logger = logging.getLogger("emonet")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def _cmd_make_demo_data(args: argparse.Namespace) -> None:
    from emonet.data.demo import make_demo_data

    ensure_writable_dir(args.out_dir)
    root = make_demo_data(
        args.out_dir, seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, size=args.size
    )
    print(f"demo archive written to {root}")


def _cmd_visibility(args: argparse.Namespace) -> None:
    from emonet.data.visibility_column import add_face_visibility

    result = add_face_visibility(
        args.annotations,
        args.img_dir,
        args.out,
        workers=args.workers,
        plot_path=args.plot,
        face_landmarker=args.face_landmarker,
    )
    for key, value in result.as_dict().items():
        print(f"{key:>14}: {value}")


def _cmd_normalize(args: argparse.Namespace) -> None:
    from emonet.data.normalize import normalize_dataset

    ensure_writable_dir(args.out_dir)
    result = normalize_dataset(
        args.annotations_dir,
        args.out_dir,
        min_visibility=args.min_visibility,
        fit_on_train=args.fit_on_train,
        filter_test_by_visibility=args.filter_test_by_visibility,
    )
    for split, path in result.outputs.items():
        print(f"{split}: {result.counts[split]['rows_written']} rows -> {path}")
    print(f"parameters ({result.normalizer.method}): {result.params_path}")


def _cmd_train(args: argparse.Namespace) -> None:
    from emonet.config import load_config
    from emonet.training.trainer import train_from_csvs

    ensure_writable_dir(args.checkpoint_dir)
    config = load_config(args.config)
    # Also a torchrun worker: `torchrun --nproc_per_node 2 -m emonet.cli train ...` trains data-parallel;
    # the other ranks would repeat rank 0's lines, so they report only problems.
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    result = train_from_csvs(
        args.train_csv,
        args.val_csv,
        args.img_dir,
        config,
        args.checkpoint_dir,
        callbacks=[lambda metrics: logger.info("epoch %d: %s", metrics["epoch"], metrics)],
        resume_from=args.resume_from,
    )
    if rank == 0:
        print(f"best val mAP {result.best_metric:.4f} at epoch {result.best_epoch}: {result.best_checkpoint}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from emonet.reports.evaluation import evaluate_checkpoint

    report = evaluate_checkpoint(
        args.checkpoint, args.annotations, args.img_dir, args.out_dir, normalizer=args.normalization
    )
    for key, value in report.metrics.items():
        print(f"{key:>20}: {value:.4f}")
    print(f"report and figures in {args.out_dir}")


def _cmd_review(args: argparse.Namespace) -> None:
    from emonet.reports.review import review_predictions_with_visualization

    table = review_predictions_with_visualization(
        args.model,
        args.annotations,
        args.img_dir,
        args.out_dir,
        num_samples=args.num_samples,
        detailed_samples=args.detailed_samples,
        sort_by=args.sort_by,
        seed=args.seed,
        normalizer=args.normalization,
        runtime=args.runtime,
    )
    print(f"reviewed {len(table)} samples; open {Path(args.out_dir) / 'index.html'} in a browser")


def _cmd_predict(args: argparse.Namespace) -> None:
    from emonet.inference.csv_scoring import predict_csv

    summary = predict_csv(
        args.model,
        args.input,
        args.out,
        img_dir=args.img_dir,
        batch_size=args.batch_size,
        on_error=args.on_error,
        max_pixels=args.max_pixels,
        runtime=args.runtime,
    )
    print(summary)


def _cmd_benchmark(args: argparse.Namespace) -> None:
    from emonet.metrics.bootstrap import BOOTSTRAP_METRICS
    from emonet.reports.benchmark import BENCHMARK_FILES, benchmark_model, write_benchmark

    check_not_inputs(
        [args.out_dir / name for name in BENCHMARK_FILES.values()],
        {"annotations": args.annotations, "model": args.model, "normalization": args.normalization},
        image_dir=args.img_dir,
    )
    ensure_writable_dir(args.out_dir)
    table = benchmark_model(
        args.model,
        args.annotations,
        args.img_dir,
        normalizer=args.normalization,
        batch_size=args.batch_size,
        n_resamples=args.n_resamples,
        confidence=args.confidence,
        seed=args.seed,
    )
    paths = write_benchmark(table, args.out_dir)
    for key in BOOTSTRAP_METRICS:
        print(f"{key:>17}: {table.intervals[key].describe('.4f')}")
    print(f"benchmark table in {paths['markdown']} and {paths['csv']}")


def _add_make_demo_data(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("make-demo-data", help="write a small synthetic archive in EMOTIC's format")
    demo.add_argument("out_dir", type=Path)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--n-train", type=_positive_int, default=300)
    demo.add_argument("--n-val", type=_positive_int, default=100)
    demo.add_argument("--n-test", type=_positive_int, default=100)
    demo.add_argument("--size", type=_positive_int, default=112, help="side of the square body crops, in pixels")
    demo.set_defaults(func=_cmd_make_demo_data)


def _add_visibility(commands: argparse._SubParsersAction) -> None:
    vis = commands.add_parser(
        "visibility", help="score face visibility of every body crop with MediaPipe's face landmarker"
    )
    vis.add_argument("--annotations", type=Path, required=True, help="a split's annotation CSV")
    vis.add_argument("--img-dir", type=Path, required=True, help="the archive's img_arrs folder")
    vis.add_argument("--out", type=Path, required=True, help="output CSV (a copy with Face_Visibility)")
    vis.add_argument("--workers", type=_positive_int, default=None, help="worker processes (default: all cores)")
    vis.add_argument("--plot", type=Path, default=None, help="write a histogram PNG of the scores here")
    vis.add_argument(
        "--face-landmarker",
        type=Path,
        default=None,
        metavar="PATH",
        help="the landmarker's model asset face_landmarker.task (default: $EMONET_FACE_LANDMARKER, "
        "else <venv>/share/emonet/face_landmarker.task)",
    )
    vis.set_defaults(func=_cmd_visibility)


def _add_normalize(commands: argparse._SubParsersAction) -> None:
    norm = commands.add_parser("normalize", help="add Valence_norm and Arousal_norm in [-1, 1]")
    norm.add_argument("--annotations-dir", type=Path, required=True, help="folder with annot_arrs_<split>.csv")
    norm.add_argument("--out-dir", type=Path, required=True)
    norm.add_argument(
        "--min-visibility", type=float, default=None, help="keep train/val rows with Face_Visibility >= X"
    )
    norm.add_argument(
        "--filter-test-by-visibility",
        action="store_true",
        help="apply --min-visibility to the test split too (its mAP is then not comparable to the EMOTIC benchmark)",
    )
    norm.add_argument("--fit-on-train", action="store_true", help="fit the bounds on the train split")
    norm.set_defaults(func=_cmd_normalize)


def _add_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a model (no Prefect, no MLflow)")
    train.add_argument(
        "--config", type=Path, default=None, help="YAML config (see emonet/config.py); default values otherwise"
    )
    train.add_argument("--train-csv", type=Path, required=True)
    train.add_argument("--val-csv", type=Path, required=True)
    train.add_argument("--img-dir", type=Path, required=True)
    train.add_argument("--checkpoint-dir", type=Path, required=True, help="last.pt and best.pt go here")
    train.add_argument("--resume-from", type=Path, default=None, help="a last.pt to continue from")
    train.set_defaults(func=_cmd_train)


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("evaluate", help="metrics, per-emotion table and figures of a checkpoint")
    evaluate.add_argument("--checkpoint", type=Path, required=True)
    evaluate.add_argument("--annotations", type=Path, required=True, help="a labelled split CSV")
    evaluate.add_argument("--img-dir", type=Path, required=True)
    evaluate.add_argument("--out-dir", type=Path, required=True)
    evaluate.add_argument("--normalization", type=Path, default=None, help="normalization.json of the training data")
    evaluate.set_defaults(func=_cmd_evaluate)


def _add_review(commands: argparse._SubParsersAction) -> None:
    review = commands.add_parser("review", help="look at predictions: grid, detailed pages, heatmaps, index.html")
    review.add_argument("--model", required=True, help="a checkpoint path or an MLflow URI (models:/emonet@champion)")
    review.add_argument("--annotations", type=Path, required=True, help="a split CSV (raw or normalized)")
    review.add_argument("--img-dir", type=Path, required=True)
    review.add_argument("--out-dir", type=Path, required=True, help="existing files of other names are kept")
    review.add_argument("--num-samples", type=_positive_int, default=20, help="crops in the grid (capped at the split)")
    review.add_argument("--detailed-samples", type=int, default=20, help="detailed pages, from the same ordering")
    review.add_argument("--sort-by", default="random", choices=["random", "best", "worst", "confidence"])
    review.add_argument("--seed", type=int, default=0)
    review.add_argument("--normalization", type=Path, default=None, help="normalization.json of the training data")
    _add_runtime(review)
    review.set_defaults(func=_cmd_review)


def _add_runtime(parser: argparse.ArgumentParser) -> None:
    from emonet.inference.onnx_runtime import RUNTIMES

    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="what runs the network: auto (ONNX Runtime for a registered model with an ONNX export, on the CPU; "
        "else torch), onnxruntime or torch (default: %(default)s)",
    )


def _add_predict(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser("predict", help="score a CSV of crops, in batches, into a predictions CSV")
    predict.add_argument("--model", required=True, help="a checkpoint path or an MLflow URI (models:/emonet@champion)")
    predict.add_argument("--input", type=Path, required=True, help="CSV with Crop_name (and --img-dir) or image_path")
    predict.add_argument("--out", type=Path, required=True, help="predictions CSV (never the input)")
    predict.add_argument("--img-dir", type=Path, default=None)
    predict.add_argument("--batch-size", type=_positive_int, default=64)
    predict.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="skip: list bad rows aside")
    predict.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse images of more pixels, from their header (default: %(default)s)",
    )
    _add_runtime(predict)
    predict.set_defaults(func=_cmd_predict)


def _add_benchmark(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "benchmark", help="the EMOTIC benchmark table: AP under both protocols, intervals, published results"
    )
    bench.add_argument("--model", required=True, help="a checkpoint path or an MLflow URI (models:/emonet@champion)")
    bench.add_argument("--annotations", type=Path, required=True, help="a labelled split CSV (the test split)")
    bench.add_argument("--img-dir", type=Path, required=True)
    bench.add_argument("--out-dir", type=Path, required=True, help="benchmark.md and benchmark.csv go here")
    bench.add_argument("--normalization", type=Path, default=None, help="normalization.json of a checkpoint")
    bench.add_argument("--batch-size", type=_positive_int, default=None)
    bench.add_argument("--n-resamples", type=_positive_int, default=1000, help="bootstrap resamples")
    bench.add_argument("--confidence", type=float, default=0.95, help="coverage of the intervals, in (0, 1)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    bench.set_defaults(func=_cmd_benchmark)


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``emonet tune``; ``python -m flows.tune`` takes the same ones."""
    parser.add_argument("--search", type=Path, required=True, help="search space YAML (configs/search/demo.yaml)")
    parser.add_argument(
        "--n-trials", type=_positive_int, required=True, help="complete or pruned trials the study reaches"
    )
    parser.add_argument("--study-name", default="emonet-demo", help="the study to create or continue")
    parser.add_argument(
        "--storage",
        default=None,
        help="Optuna RDB URL (default: $EMONET_OPTUNA_STORAGE, else optuna.db beside the MLflow store)",
    )
    parser.add_argument("--config", type=Path, default=None, help="the recipe the trials vary (default: the library's)")
    parser.add_argument("--epochs", type=_positive_int, default=None, help="epochs per trial (default: the config's)")
    parser.add_argument("--data-root", type=Path, default=None, help="EMOTIC archive root (default: the demo data)")
    parser.add_argument("--demo-dir", type=Path, default=Path("data/demo"), help="the demo archive, made when missing")
    parser.add_argument(
        "--out-dir", type=Path, default=Path("outputs/tune"), help="best_config.yaml and the sweep's CSVs"
    )
    parser.add_argument("--workers", type=_positive_int, default=1, help="processes running trials at once")
    parser.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median")
    parser.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    parser.add_argument("--experiment", default="emonet-tune", help="MLflow experiment of the study's runs")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or mlruns/)")


def _cmd_tune(args: argparse.Namespace) -> None:
    from emonet.config import load_config
    from emonet.data.demo import ensure_demo_archive
    from emonet.tuning.space import load_search_space
    from emonet.tuning.study import describe_result, prepare_sweep_data, tune

    config = load_config(args.config)
    space = load_search_space(args.search, config)  # refused here, before any data or training
    ensure_writable_dir(args.out_dir)
    root = args.data_root if args.data_root is not None else ensure_demo_archive(args.demo_dir)
    result = tune(
        space,
        prepare_sweep_data(root, args.out_dir / "data"),
        n_trials=args.n_trials,
        study_name=args.study_name,
        out_dir=args.out_dir,
        storage=args.storage,
        config=config,
        epochs=args.epochs,
        pruner=args.pruner,
        seed=args.seed,
        workers=args.workers,
        tracking_uri=args.tracking_uri,
        experiment_name=args.experiment,
    )
    print(describe_result(result))


def _add_tune(commands: argparse._SubParsersAction) -> None:
    tune = commands.add_parser("tune", help="an Optuna sweep over the recipe, tracked in MLflow (no Prefect)")
    add_tune_arguments(tune)
    tune.set_defaults(func=_cmd_tune)


def add_monitor_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``emonet monitor``; ``python -m flows.monitor`` takes the same ones."""
    from emonet.monitoring.drift import DEFAULT_FALSE_ALARM_RATE
    from emonet.monitoring.monitor import DEFAULT_MODEL_URI

    parser.add_argument("--batch", type=Path, required=True, help="a folder of crops, or a CSV listing them")
    parser.add_argument("--model", default=DEFAULT_MODEL_URI, help="a registered model URI (default: %(default)s)")
    parser.add_argument("--img-dir", type=Path, default=None, help="for a CSV: where its crops or relative paths are")
    parser.add_argument(
        "--reference-csv", type=Path, default=None, help="validation split for a version without a reference"
    )
    parser.add_argument("--reference-img-dir", type=Path, default=None, help="the img_arrs folder of --reference-csv")
    parser.add_argument(
        "--false-alarm-rate",
        type=float,
        default=DEFAULT_FALSE_ALARM_RATE,
        help="family-wise rate of flagging a batch drawn like the reference (default: %(default)s)",
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="also write the summary and report here")
    parser.add_argument("--no-report", action="store_true", help="skip Evidently's HTML report (about 10 s)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or mlruns/)")
    _add_runtime(parser)


def _cmd_monitor(args: argparse.Namespace) -> None:
    import mlflow

    from emonet.monitoring.monitor import describe_monitoring, monitor_batch
    from emonet.utils.store import check_store, default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    result = monitor_batch(
        args.batch,
        args.model,
        img_dir=args.img_dir,
        reference_csv=args.reference_csv,
        reference_img_dir=args.reference_img_dir,
        false_alarm_rate=args.false_alarm_rate,
        runtime=args.runtime,
        out_dir=args.out_dir,
        report=not args.no_report,
        progress=True,
    )
    print(describe_monitoring(result))


def _add_monitor(commands: argparse._SubParsersAction) -> None:
    monitor = commands.add_parser(
        "monitor", help="drift and performance of a batch of new crops against the model's reference (no Prefect)"
    )
    add_monitor_arguments(monitor)
    monitor.set_defaults(func=_cmd_monitor)


# In the order `emonet --help` lists the sub-commands.
_SUBCOMMANDS = (
    _add_make_demo_data,
    _add_visibility,
    _add_normalize,
    _add_train,
    _add_evaluate,
    _add_review,
    _add_predict,
    _add_benchmark,
    _add_tune,
    _add_monitor,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emonet", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_subcommand in _SUBCOMMANDS:
        add_subcommand(commands)
    return parser


def _original_message(error: BaseException) -> str:
    """The error's own message. An error raised in a DataLoader worker (a malformed crop,
    say) is re-raised by torch with the worker's traceback in its message, whose last
    line is ``ValueError: <the original message>``."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def _describe_os_error(error: OSError) -> str:
    # The path first, then the reason, without the "[Errno 13]" prefix a user cannot act on.
    if error.filename is None:
        return str(error)
    paths = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 is not None else "")
    return f"{paths}: {error.strerror or error}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        args.func(args)
    except TrainingStopped as stopped:
        # SIGTERM or SIGINT: the work stopped at a safe point (a sweep's trial is marked failed).
        print(f"emonet {args.command}: stopped: {stopped}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        # A user's mistake: one clear line, no traceback.
        print(f"emonet {args.command}: error: {_original_message(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        # The system refused a file operation (permissions, a full disk, a read-only
        # mount): one line naming the path; exit code 1, as for any other failure.
        print(f"emonet {args.command}: error: {_describe_os_error(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
