"""The one prediction loop: a model over a dataset, in batches, under ``inference_mode``.

Evaluation, the review, batch prediction, the MLflow model and the validation pass of
training all call :func:`predict_split`; the preprocessing it applies is the evaluation
preset of :mod:`emonet.data.transforms`, built once by :func:`eval_transform`. It needs no
training code: serving imports it without the training loop, scikit-learn or the losses.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from emonet.config import EmoNetConfig
from emonet.data.images import check_image
from emonet.data.loaders import make_loader
from emonet.data.transforms import prepare_item
from emonet.models.encoders import config_transforms
from emonet.schema import AFFECT_COLUMNS, NUM_EMOTIONS

logger = logging.getLogger(__name__)

__all__ = ["ImageInputs", "Predictions", "eval_transform", "predict_split", "to_device"]

# Reads one input row: its body crop and, for body_context models, its full image.
RowReader = Callable[[int], tuple[np.ndarray, np.ndarray | None]]


@dataclass(frozen=True, eq=False)
class Predictions:
    """Model outputs for every sample of a split, in dataset order of ``indices``.

    ``emotions_true``/``affect_true`` are set when the dataset is labelled (an
    :class:`~emonet.data.dataset.EmoticDataset`), else None; ``losses`` when a criterion was given.
    """

    emotion_prob: np.ndarray  # (N, 26) float32 sigmoid probabilities, schema.EMOTIONS order
    affect_pred: np.ndarray  # (N, 2) float32 valence, arousal in [-1, 1]
    indices: np.ndarray  # (N,) int64 dataset index of each sample
    emotions_true: np.ndarray | None = None  # (N, 26) float32 multi-hot targets
    affect_true: np.ndarray | None = None  # (N, 2) float32 targets in [-1, 1]
    losses: dict[str, float] | None = None  # sample-weighted mean loss, emotion and affect terms
    features: np.ndarray | None = None  # (N, F) float32 pooled trunk features, when asked for

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labelled(self) -> bool:
        return self.emotions_true is not None


def eval_transform(config: EmoNetConfig) -> Any:
    """The deterministic evaluation preset for a model trained with ``config``.

    Body crops are resized to ``train.image_size``; the ``body_context`` variant also
    takes the full image at ``train.context_size``. Each stream is normalized with its
    encoder's mean and std (:func:`emonet.models.encoders.config_transforms`).
    """
    return config_transforms(config, train=False)


class ImageInputs(Dataset):
    """Unlabelled images for prediction, read one row at a time by ``read(index)``.

    ``read`` returns ``(crop, context)``: ``H x W x 3`` uint8 arrays (``context`` is
    None for the body model). A read or a malformed image raises from ``__getitem__``,
    so with ``num_workers=0`` the caller's error (naming the row) reaches it unchanged.

    Examples
    --------
    >>> images = [np.zeros((40, 30, 3), np.uint8)]
    >>> inputs = ImageInputs(lambda i: (images[i], None), len(images), build_transforms(32, train=False))
    >>> inputs[0]["body"].shape
    torch.Size([3, 32, 32])
    """

    def __init__(self, read: RowReader, length: int, transform: Any, with_context: bool = False) -> None:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.read = read
        self.length = length
        self.transform = transform
        self.with_context = with_context

    @classmethod
    def from_arrays(
        cls, crops: list[np.ndarray], contexts: list[np.ndarray] | None, transform: Any, with_context: bool
    ) -> ImageInputs:
        """Inputs from images already in memory (or memory-mapped)."""
        if with_context:
            if contexts is None:
                raise ValueError(
                    "this is a body_context model: pass contexts (the full image of every crop) along with the crops"
                )
            if len(contexts) != len(crops):
                raise ValueError(f"got {len(crops)} crops but {len(contexts)} contexts; need one full image per crop")
            return cls(lambda i: (crops[i], contexts[i]), len(crops), transform, with_context=True)
        return cls(lambda i: (crops[i], None), len(crops), transform)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        crop, context = self.read(index)
        crop = check_image(crop, f"row {index}: crop")
        if self.with_context:
            context = check_image(context, f"row {index}: context")
        item = prepare_item(self.transform, crop, context if self.with_context else None)
        item["index"] = index
        return item


def to_device(batch: Mapping[str, Any], device: torch.device, key: str) -> torch.Tensor:
    """One image tensor of a collated batch on ``device``; channels_last on CUDA, where
    cuDNN's NHWC convolutions are faster (and use tensor cores under AMP)."""
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return batch[key].to(device, non_blocking=True, memory_format=memory_format)


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """float16 autocast on CUDA when ``enabled`` (supported by every GPU with tensor cores); a no-op on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=enabled and device.type == "cuda")


def predict_split(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    amp: bool = True,
    criterion: nn.Module | None = None,
    progress: bool = False,
    desc: str = "predict",
    features: bool = False,
) -> Predictions:
    """Emotion probabilities and valence/arousal for every sample of ``data``.

    Parameters
    ----------
    model : an :class:`~emonet.models.network.EmoNet`; put in eval mode (and channels_last on CUDA).
    data : a dataset whose items hold ``body`` (and ``context`` for ``body_context``
        models), ``index`` and, when labelled, ``emotions`` and ``affect``
        (:class:`~emonet.data.dataset.EmoticDataset`, :class:`ImageInputs`); or a ready
        ``DataLoader`` over one (e.g. with a distributed sampler).
    batch_size, num_workers : of the loader built for a dataset.
    device : where to run; defaults to the model's device.
    amp : float16 autocast on CUDA (ignored on CPU).
    criterion : with labelled data, also returns the mean loss (``EmoNetLoss``).
    progress : show a tqdm bar over batches, titled ``desc``.
    features : also return the pooled trunk features the heads read (what monitoring
        compares), as ``Predictions.features``.

    Returns
    -------
    Predictions
        Arrays in loader order; ``indices`` maps each row back to the dataset.

    Raises
    ------
    ValueError
        Empty data, a ``criterion`` on unlabelled data, a ``body_context`` model given
        items without ``context``, or ``features`` from a model that does not return them
        (an ONNX export made before they were an output).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    loader = (
        data if isinstance(data, DataLoader) else make_loader(data, batch_size, num_workers=num_workers, device=device)
    )
    model.eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    with_context = model.config.uses_context
    n_rows = len(loader.sampler)
    emotion_prob = np.empty((n_rows, NUM_EMOTIONS), dtype=np.float32)
    affect_pred = np.empty((n_rows, len(AFFECT_COLUMNS)), dtype=np.float32)
    indices = np.empty(n_rows, dtype=np.int64)
    emotions_true: np.ndarray | None = None
    affect_true: np.ndarray | None = None
    pooled: np.ndarray | None = None
    sums = {"total": 0.0, "emotion": 0.0, "affect": 0.0}
    pos = 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress, dynamic_ncols=True)
    with torch.inference_mode(), contextlib.closing(bar):
        for batch in bar:
            body = to_device(batch, device, "body")  # (B, 3, S, S)
            if with_context and "context" not in batch:
                raise ValueError("the model is the body_context variant but the batch has no 'context'")
            context = to_device(batch, device, "context") if with_context else None  # (B, 3, S', S')
            labelled = "emotions" in batch
            if pos == 0 and labelled:
                emotions_true = np.empty((n_rows, NUM_EMOTIONS), dtype=np.float32)
                affect_true = np.empty((n_rows, len(AFFECT_COLUMNS)), dtype=np.float32)
            with autocast(device, amp):
                output = model(body, context) if with_context else model(body)
                if criterion is not None:
                    if not labelled:
                        raise ValueError("a criterion needs labelled data (items with 'emotions' and 'affect')")
                    losses = criterion(output, batch["emotions"].to(device), batch["affect"].to(device))
            n = body.shape[0]
            stop = pos + n
            emotion_prob[pos:stop] = torch.sigmoid(output.emotion_logits.float()).cpu().numpy()
            affect_pred[pos:stop] = output.affect.float().cpu().numpy()
            indices[pos:stop] = torch.as_tensor(batch["index"]).numpy()
            if features:
                if output.features is None:
                    raise ValueError(
                        f"{type(model).__name__} returns no features (an ONNX export made before they were "
                        "an output): run it with the torch runtime"
                    )
                if pooled is None:
                    pooled = np.empty((n_rows, output.features.shape[1]), dtype=np.float32)
                pooled[pos:stop] = output.features.float().cpu().numpy()
            if emotions_true is not None and affect_true is not None:
                emotions_true[pos:stop] = batch["emotions"].float().numpy()
                affect_true[pos:stop] = batch["affect"].float().numpy()
            if criterion is not None:
                sums["total"] += losses.total.item() * n
                sums["emotion"] += losses.emotion.item() * n
                sums["affect"] += losses.affect.item() * n
            pos = stop
    if pos == 0:
        raise ValueError("nothing to predict: the data holds no sample")
    return Predictions(
        emotion_prob=emotion_prob[:pos],
        affect_pred=affect_pred[:pos],
        indices=indices[:pos],
        emotions_true=emotions_true[:pos] if emotions_true is not None else None,
        affect_true=affect_true[:pos] if affect_true is not None else None,
        losses={key: value / pos for key, value in sums.items()} if criterion is not None else None,
        features=pooled[:pos] if pooled is not None else None,
    )
