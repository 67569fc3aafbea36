"""Shared fixtures: a handful of small arrays written in the real archive's layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from emonet.schema import (
    CSV_COLUMNS,
    EMOTIONS,
    annotations_path,
    arrays_dir,
    crop_name,
    image_name,
)


def write_fake_archive(root: Path, rows_per_split: int = 6, crop_size: int = 40, seed: int = 0) -> Path:
    """Write a tiny archive under ``root``: random pixels, valid labels, archive names.

    Two persons share each full image; the first row of every split has its Width and
    Height swapped, as on some rows of the real archive.
    """
    rng = np.random.default_rng(seed)
    img_dir = arrays_dir(root)
    img_dir.mkdir(parents=True, exist_ok=True)
    next_image = 0
    for split in ("train", "val", "test"):
        records = []
        for i in range(rows_per_split):
            if i % 2 == 0:
                # The full image is stored at half the original photo's size.
                width, height = 200.0, 120.0
                image = rng.integers(0, 256, size=(60, 100, 3), dtype=np.uint8)
                arr_name = image_name(next_image)
                np.save(img_dir / arr_name, image)
                next_image += 1
            crop = rng.integers(0, 256, size=(crop_size, crop_size, 3), dtype=np.uint8)
            np.save(img_dir / crop_name(split, i), crop)
            emotions = (rng.random(len(EMOTIONS)) < 0.3).astype(float)
            emotions[i % len(EMOTIONS)] = 1.0
            w, h = (height, width) if i == 0 else (width, height)
            records.append(
                {
                    "Filename": f"photo_{i}.jpg",
                    "Width": w,
                    "Height": h,
                    "Age": "Adult",
                    "Gender": "Female" if i % 2 else "Male",
                    "Valence": float(rng.uniform(1, 10)),
                    "Arousal": float(rng.uniform(1, 10)),
                    "Dominance": float(rng.uniform(1, 10)),
                    **dict(zip(EMOTIONS, emotions)),
                    "X_min": 10.0 + 40 * (i % 2),
                    "Y_min": 5.0,
                    "X_max": 90.0 + 40 * (i % 2),
                    "Y_max": 115.0,
                    "Arr_name": arr_name,
                    "Crop_name": crop_name(split, i),
                }
            )
        csv_path = annotations_path(root, split)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(records, columns=list(CSV_COLUMNS)).to_csv(csv_path, index=False)
    return root


@pytest.fixture
def fake_archive(tmp_path: Path) -> Path:
    """Root of a tiny archive (6 rows per split, 40 px random crops)."""
    return write_fake_archive(tmp_path / "emotic")
