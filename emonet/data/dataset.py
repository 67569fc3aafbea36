"""A PyTorch ``Dataset`` over one split of the EMOTIC archive (validated annotations from
:mod:`emonet.data.annotations`, arrays read lazily by :mod:`emonet.data.arrays`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from emonet.data.annotations import affect_targets, load_annotations
from emonet.data.arrays import load_array
from emonet.data.transforms import prepare_item
from emonet.schema import EMOTIONS


class EmoticDataset(Dataset):
    """One split of the archive as a PyTorch ``Dataset``.

    Each item is a dict:

    - ``"body"``: the body crop, ``uint8`` tensor ``(3, H, W)``, or the output of
      ``transform`` (a float tensor ``(3, S, S)`` with the presets in ``emonet.data.transforms``);
    - ``"context"`` (only with ``with_context=True``): the full image ``Arr_name``;
    - ``"emotions"``: float32 multi-hot ``(26,)`` in paper order;
    - ``"affect"``: float32 ``(2,)``, valence and arousal in [-1, 1], or NaN for a
      row whose affect annotation is invalid (see :func:`load_annotations`); the
      loss and the metrics skip NaN targets, so the row still trains and scores its
      emotions;
    - ``"index"``: the row index in the CSV.

    ``transform`` is called as ``transform(body)`` or, with context,
    ``transform(body, context)`` returning both, so random flips can be shared between
    the two streams.

    Parameters
    ----------
    annotations : a validated DataFrame (see :func:`load_annotations`) or a CSV path.
    img_dir : folder with the ``.npy`` arrays.
    transform : optional callable as above.
    with_context : also return the full image (for the two-stream ``body_context`` model).
    """

    def __init__(
        self,
        annotations: pd.DataFrame | str | Path,
        img_dir: str | Path,
        transform: Callable[..., Any] | None = None,
        with_context: bool = False,
    ) -> None:
        self.annotations = annotations if isinstance(annotations, pd.DataFrame) else load_annotations(annotations)
        self.img_dir = Path(img_dir)
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"image array folder not found: {self.img_dir}")
        self.transform = transform
        self.with_context = with_context
        # Small, fixed-size arrays only: the pixels stay on disk until __getitem__.
        self._emotions = self.annotations[list(EMOTIONS)].to_numpy(dtype=np.float32)
        self._affect = affect_targets(self.annotations)
        self._crop_names = self.annotations["Crop_name"].tolist()
        self._image_names = self.annotations["Arr_name"].tolist()

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int) -> dict[str, Any]:
        crop = load_array(self.img_dir, self._crop_names[index])
        image = load_array(self.img_dir, self._image_names[index]) if self.with_context else None
        item: dict[str, Any] = prepare_item(self.transform, crop, image)
        item["emotions"] = torch.from_numpy(self._emotions[index])
        item["affect"] = torch.from_numpy(self._affect[index])
        item["index"] = index
        return item
