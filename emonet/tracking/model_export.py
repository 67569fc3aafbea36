"""The ONNX export a registered model carries, checked against torch before it is logged.

:func:`export_checked_onnx` exports a serving checkpoint with the dynamo exporter
(:func:`emonet.models.onnx_export.export_onnx`), runs the same preprocessed crops through
torch and ONNX Runtime with the one prediction loop, and keeps the file only when no
probability or valence/arousal differs by more than :data:`ONNX_TOLERANCE`. Anything that
goes wrong (an operator the exporter cannot translate, a missing ``onnxscript``, a
difference over the tolerance) costs the export, never the registration: the model then
serves with torch, and the result says why (:attr:`OnnxExport.tag`, the version's
``onnx_export`` tag).

:func:`quantize_checked_int8` adds, when asked, an INT8 copy of the export: ONNX
Runtime's static quantization (QDQ, weights per channel), calibrated on the first
validation crops, with its validation mAP difference from the float export measured by
the paired bootstrap on the whole validation split. It is served only when asked for
(``inference_runtime`` ``onnxruntime-int8``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from emonet.config import EmoNetConfig
from emonet.data.annotations import load_annotations
from emonet.data.dataset import EmoticDataset
from emonet.inference.loop import ImageInputs, eval_transform, predict_split
from emonet.inference.onnx_runtime import PRECISION_KEY, OnnxModel
from emonet.metrics.bootstrap import BootstrapInterval, paired_bootstrap_map_difference
from emonet.models.checkpoint import load_checkpoint
from emonet.models.encoders import stream_preprocessing
from emonet.models.onnx_export import ONNX_FILE, export_onnx, onnx_input_shapes
from emonet.utils.io import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "INT8_EXPORT_TAG",
    "INT8_FILE",
    "ONNX_CHECK_ROWS",
    "ONNX_EXPORT_TAG",
    "ONNX_TOLERANCE",
    "QUANTIZATIONS",
    "Int8Export",
    "ModelExports",
    "OnnxExport",
    "check_export_options",
    "check_inputs",
    "export_checked_onnx",
    "make_exports",
    "quantize_checked_int8",
]

# Largest difference allowed between torch and ONNX Runtime, on any probability or on
# valence/arousal in [-1, 1]; float32 reorderings give about 1e-6 on a ResNet.
ONNX_TOLERANCE = 1e-4
ONNX_CHECK_ROWS = 64  # validation crops the check runs (the first ones of the split)
RANDOM_CHECK_ROWS = 8  # random images, when no validation crops are given
ONNX_EXPORT_TAG = "onnx_export"  # the registered version's tag that tells how its export went
INT8_FILE = "emonet-int8.onnx"
INT8_EXPORT_TAG = "onnx_int8"  # how the INT8 export went, with its validation mAP difference
QUANTIZATIONS: tuple[str, ...] = ("int8",)


def _one_line(error: Exception) -> str:
    """``Type: first line of the message``: what a tag can hold of an exporter's long report."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


@dataclass(frozen=True)
class OnnxExport:
    """How the export of one model went: ``path`` is None when it failed (``error`` says why)."""

    path: Path | None
    checked_on: str  # e.g. "64 validation crops"
    max_difference: float | None = None
    error: str | None = None

    @property
    def tag(self) -> str:
        """The text of the version's ``onnx_export`` tag."""
        if self.path is None:
            return f"failed: {self.error}; the model serves with torch only"
        return (
            f"checked: largest difference {self.max_difference:.1e} from torch on {self.checked_on} "
            f"(tolerance {ONNX_TOLERANCE:.0e})"
        )


def check_inputs(
    config: EmoNetConfig, csv_path: str | Path | None = None, img_dir: str | Path | None = None
) -> tuple[Dataset, str]:
    """The crops the check runs, and their description: the first :data:`ONNX_CHECK_ROWS`
    rows of ``csv_path`` (an EMOTIC split CSV, its arrays in ``img_dir``), or seeded random
    images at the model's sizes when no CSV is given."""
    if csv_path is not None:
        if img_dir is None:
            raise ValueError("img_dir is needed with csv_path: the check reads the split's crops")
        rows = load_annotations(csv_path).head(ONNX_CHECK_ROWS).reset_index(drop=True)
        dataset = EmoticDataset(rows, img_dir, eval_transform(config), with_context=config.model.uses_context)
        return dataset, f"{len(rows)} crops of {Path(csv_path).name}"
    rng = np.random.default_rng(0)
    body, context = stream_preprocessing(config)
    size, context_size = body.size, context.size if context is not None else body.size

    def image(side: int) -> np.ndarray:
        return rng.integers(0, 256, (side + 7, side - 5, 3), dtype=np.uint8)  # not square: resized as crops are

    crops = [image(size) for _ in range(RANDOM_CHECK_ROWS)]
    contexts = [image(context_size) for _ in range(RANDOM_CHECK_ROWS)] if config.model.uses_context else None
    inputs = ImageInputs.from_arrays(crops, contexts, eval_transform(config), config.model.uses_context)
    return inputs, f"{RANDOM_CHECK_ROWS} random images (no validation crops were given)"


def export_checked_onnx(
    checkpoint_path: str | Path,
    dest: str | Path,
    csv_path: str | Path | None = None,
    img_dir: str | Path | None = None,
) -> OnnxExport:
    """Export the checkpoint to ``dest`` and check it against torch (module docstring).

    Never raises for a failed export or check: the returned :class:`OnnxExport` has
    ``path`` None and the reason, which is also logged as a warning; ``dest`` is removed.
    """
    dest = Path(dest)
    checked_on = "no crops"
    try:
        model, config, _ = load_checkpoint(checkpoint_path)
        data, checked_on = check_inputs(config, csv_path, img_dir)
        if len(data) == 0:
            raise ValueError(f"{csv_path} has no rows to check the export on")
        export_onnx(model, config, dest)
        exported = OnnxModel(dest, config.model)
        expected = predict_split(model, data, device="cpu")
        found = predict_split(exported, data, device="cpu")
        difference = float(
            max(
                np.abs(expected.emotion_prob - found.emotion_prob).max(),
                np.abs(expected.affect_pred - found.affect_pred).max(),
            )
        )
        if not difference <= ONNX_TOLERANCE:  # also catches NaN
            raise ValueError(
                f"ONNX Runtime differs from torch by {difference:.2e} on {checked_on}, over the tolerance "
                f"{ONNX_TOLERANCE:.0e}"
            )
    except Exception as error:  # any failure costs the export, never the registration
        dest.unlink(missing_ok=True)
        reason = _one_line(error)
        logger.warning("ONNX export of %s failed, so the model serves with torch only: %s", checkpoint_path, reason)
        return OnnxExport(path=None, checked_on=checked_on, error=reason)
    result = OnnxExport(path=dest, checked_on=checked_on, max_difference=difference)
    logger.info("ONNX export of %s %s", checkpoint_path, result.tag)
    return result


@dataclass(frozen=True)
class Int8Export:
    """How the INT8 quantization of an export went: ``path`` is None when it failed."""

    path: Path | None
    difference: BootstrapInterval | None = None  # validation mAP, INT8 minus float (scikit-learn AP)
    evaluated_on: str = ""
    error: str | None = None

    @property
    def tag(self) -> str:
        """The text of the version's ``onnx_int8`` tag."""
        if self.path is None or self.difference is None:
            return f"failed: {self.error}; the version has the float export only"
        confidence = f"{100 * self.difference.confidence:g}%"
        return (
            f"validation mAP (scikit-learn AP) of INT8 minus float: {self.difference.describe('+.4f')} "
            f"({confidence} paired bootstrap, {self.difference.n_resamples} resamples) on {self.evaluated_on}; "
            "served only with inference_runtime 'onnxruntime-int8'"
        )

    def metrics(self) -> dict[str, float]:
        """The difference and its interval, as the run's metrics."""
        if self.difference is None:
            return {}
        return {
            "int8_val_mAP_difference": self.difference.estimate,
            "int8_val_mAP_difference_low": self.difference.low,
            "int8_val_mAP_difference_high": self.difference.high,
        }


def _batches(data: Dataset, names: list[str], batch_size: int = 16) -> Iterator[dict[str, np.ndarray]]:
    """The preprocessed inputs of ``data``, ``batch_size`` rows at a time, as the graph's feeds."""
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        yield {name: np.stack([item[name].numpy() for item in items]) for name in names}


def _quantize(float_path: Path, dest: Path, calibration: Dataset, names: list[str]) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = _batches(calibration, names)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    with atomic_path(dest) as tmp:
        quantize_static(
            str(float_path),
            str(tmp),
            Calibration(),
            quant_format=QuantFormat.QDQ,  # what ONNX Runtime's CPU kernels fuse into integer convolutions
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = PRECISION_KEY, "int8"
        onnx.save(proto, str(tmp))


def quantize_checked_int8(
    checkpoint_path: str | Path,
    float_path: str | Path,
    dest: str | Path,
    val_csv: str | Path,
    img_dir: str | Path,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
) -> Int8Export:
    """Quantize the float export ``float_path`` to INT8 at ``dest`` and measure what it costs.

    Calibration reads the first :data:`ONNX_CHECK_ROWS` crops of ``val_csv``; both exports
    then score the whole validation split, and the validation mAP difference (INT8 minus
    float) gets a paired-bootstrap interval. Like the export, a failure never fails the
    registration: the result has ``path`` None and the reason, also logged.
    """
    dest = Path(dest)
    evaluated_on = Path(val_csv).name
    try:
        _, config, _ = load_checkpoint(checkpoint_path)
        calibration, _ = check_inputs(config, val_csv, img_dir)
        names = list(onnx_input_shapes(config))
        _quantize(Path(float_path), dest, calibration, names)
        rows = load_annotations(val_csv)
        data = EmoticDataset(rows, img_dir, eval_transform(config), with_context=config.model.uses_context)
        evaluated_on = f"{len(rows)} crops of {Path(val_csv).name}"
        exact = predict_split(OnnxModel(float_path, config.model), data, device="cpu")
        quantized = predict_split(OnnxModel(dest, config.model), data, device="cpu")
        assert exact.emotions_true is not None
        difference = paired_bootstrap_map_difference(
            exact.emotions_true,
            quantized.emotion_prob,
            exact.emotion_prob,
            n_resamples=n_resamples,
            confidence=confidence,
        )
    except Exception as error:  # any failure costs the INT8 export, never the registration
        dest.unlink(missing_ok=True)
        reason = _one_line(error)
        logger.warning("INT8 quantization of %s failed: %s", float_path, reason)
        return Int8Export(path=None, evaluated_on=evaluated_on, error=reason)
    result = Int8Export(path=dest, difference=difference, evaluated_on=evaluated_on)
    logger.info("INT8 export of %s: %s", checkpoint_path, result.tag)
    return result


@dataclass(frozen=True)
class ModelExports:
    """The exports a registered version gets: None where not asked for."""

    onnx: OnnxExport | None
    int8: Int8Export | None = None

    def artifacts(self) -> dict[str, str]:
        """The pyfunc artifacts (``onnx``, ``onnx_int8``: the names
        :mod:`emonet.inference.pyfunc_model` reads) of the exports that succeeded."""
        found = {"onnx": self.onnx.path if self.onnx else None, "onnx_int8": self.int8.path if self.int8 else None}
        return {name: str(path) for name, path in found.items() if path is not None}

    def tags(self) -> dict[str, str]:
        """The version's ``onnx_export`` and (when asked for) ``onnx_int8`` tags."""
        tags = {ONNX_EXPORT_TAG: self.onnx.tag if self.onnx is not None else "not exported (onnx=False)"}
        if self.int8 is not None:
            tags[INT8_EXPORT_TAG] = self.int8.tag
        return tags


def check_export_options(
    onnx: bool, check_csv: str | Path | None, img_dir: str | Path | None, quantize: str | None
) -> None:
    """Refuse, before any work, a ``quantize`` that :func:`make_exports` cannot do."""
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)} or None, got {quantize!r}")
    if not onnx or check_csv is None or img_dir is None:
        raise ValueError(
            "quantize='int8' needs the ONNX export (onnx=True) and validation crops to calibrate and "
            "measure it on (check_csv and img_dir)"
        )


def make_exports(
    serving_path: str | Path,
    folder: str | Path,
    *,
    onnx: bool = True,
    check_csv: str | Path | None = None,
    img_dir: str | Path | None = None,
    quantize: str | None = None,
) -> ModelExports:
    """The ONNX export of ``serving_path`` (and its INT8 copy with ``quantize="int8"``)
    written into ``folder``, each checked as its function says; nothing raises for a
    failed export (:func:`check_export_options` refuses bad options first)."""
    check_export_options(onnx, check_csv, img_dir, quantize)
    if not onnx:
        return ModelExports(onnx=None)
    folder = Path(folder)
    export = export_checked_onnx(serving_path, folder / ONNX_FILE, check_csv, img_dir)
    if quantize is None:
        return ModelExports(onnx=export)
    assert check_csv is not None and img_dir is not None
    if export.path is None:
        return ModelExports(onnx=export, int8=Int8Export(path=None, error="no float export to quantize"))
    return ModelExports(
        onnx=export, int8=quantize_checked_int8(serving_path, export.path, folder / INT8_FILE, check_csv, img_dir)
    )
