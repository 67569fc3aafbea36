"""Batch inference as a Prefect flow: score a CSV of body crops with a registered EmoNet
model (the ``champion`` by default) and write the predictions CSV.

Run it once with ``python -m flows.batch_predict crops.csv predictions.csv``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow
from pydantic import Field

from emonet.data.images import DEFAULT_MAX_PIXELS
from emonet.utils.reaper import ensure_reaper
from tasks.predict import batch_predict


@flow(name="emonet-batch-predict", log_prints=True)
def emonet_batch_predict(
    input_csv: Path,
    output_csv: Path,
    img_dir: Path | None = None,
    model_uri: str = "models:/emonet@champion",
    batch_size: Annotated[int, Field(ge=1)] = 64,
    tracking_uri: str | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    max_pixels: Annotated[int, Field(ge=1)] = DEFAULT_MAX_PIXELS,
    runtime: Literal["auto", "onnxruntime", "onnxruntime-int8", "torch"] = "auto",
) -> dict[str, Any]:
    """Predict emotions and valence/arousal for every crop listed in a CSV.

    Args:
        input_csv: An `image_path` column (crop files; relative paths are taken from
            `img_dir`, else from the CSV's folder), or the archive's `Crop_name` column
            with `img_dir`. body_context models also need `context_path` / `Arr_name`.
        output_csv: Where the predictions go (never the input file).
        img_dir: The archive's `img_arrs` folder, or the base of relative image paths.
        model_uri: MLflow model URI (`models:/emonet@champion`, `runs:/<id>/model`) or a
            checkpoint path.
        batch_size: Rows read and predicted at a time.
        tracking_uri: MLflow tracking and registry URI; default `MLFLOW_TRACKING_URI`
            or the SQLite store under `mlruns/`.
        on_error: `raise` stops at the first unreadable image; `skip` leaves such rows
            out and lists them in `<output stem>.skipped.csv`.
        max_pixels: Images with more pixels (height x width, read from the file's
            header before decoding) are bad rows, raised or skipped as `on_error` says.
        runtime: What runs the network: `auto` (ONNX Runtime when the registered model
            has its ONNX export and runs on the CPU, else torch), `onnxruntime`, `torch`,
            or `onnxruntime-int8` for a version registered with INT8 quantization.
    """
    ensure_reaper()
    check_batch_inputs(model_uri, output_csv, tracking_uri)
    return batch_predict(
        model_uri=model_uri,
        input_csv=input_csv,
        output_csv=output_csv,
        img_dir=img_dir,
        batch_size=batch_size,
        on_error=on_error,
        max_pixels=max_pixels,
        runtime=runtime,
    )


def check_batch_inputs(model_uri: str, output_csv: Path, tracking_uri: str | None) -> None:
    """Point MLflow at the store and check, before any work, that a ``models:/`` URI names
    a registered version or alias and that ``output_csv``'s folder can be written.

    Raises
    ------
    ValueError
        One line: the store is not an MLflow store, or the URI names no registered
        model, version or alias (the ones that exist are listed).
    OSError
        The output folder cannot be created or written.
    """
    # Imported here, not at module level: importing the flow must stay cheap and
    # side-effect free (default_tracking_uri creates mlruns/).
    import mlflow

    from emonet.inference.loading import check_registered_model_uri
    from emonet.utils.io import ensure_writable_dir
    from emonet.utils.store import check_store, default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    check_registered_model_uri(model_uri)
    ensure_writable_dir(Path(output_csv).absolute().parent)


def main(argv: list[str] | None = None) -> int:
    """Run the flow once in this process (ephemeral Prefect) and print its summary."""
    parser = argparse.ArgumentParser(description="Score a CSV of body crops with an EmoNet model.")
    parser.add_argument("input_csv", type=Path, help="CSV with image_path, or Crop_name with --img-dir")
    parser.add_argument("output_csv", type=Path, help="predictions CSV to write")
    parser.add_argument("--img-dir", type=Path, default=None, help="img_arrs folder or base of relative paths")
    parser.add_argument("--model-uri", default="models:/emonet@champion", help="MLflow model URI or checkpoint path")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or mlruns/mlflow.db")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images")
    parser.add_argument(
        "--runtime", choices=("auto", "onnxruntime", "onnxruntime-int8", "torch"), default="auto", help="default: auto"
    )
    args = parser.parse_args(argv)
    try:  # before Prefect starts: a bad model URI or output folder is one line, not a traceback
        check_batch_inputs(args.model_uri, args.output_csv, args.tracking_uri)
    except (ValueError, OSError) as error:
        print(f"emonet-batch-predict: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ValueError) else 1
    summary = emonet_batch_predict(
        input_csv=args.input_csv,
        output_csv=args.output_csv,
        img_dir=args.img_dir,
        model_uri=args.model_uri,
        batch_size=args.batch_size,
        tracking_uri=args.tracking_uri,
        on_error=args.on_error,
        max_pixels=args.max_pixels,
        runtime=args.runtime,
    )
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
