"""Two labelled batches for the monitoring demo (``make monitor``), drawn from the demo generator.

``like`` is drawn as the demo archive's validation split is (another seed of
:func:`emonet.data.demo.make_demo_data`): a model's reference should not tell it apart.
``shifted`` is drawn from the same generator and then moved the way a new camera or site
moves data: darker scenes (pixels times 0.55), more people seen from behind (no face),
and another emotion mix (rows with a negative emotion three times as likely).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from emonet.data.annotations import load_annotations
from emonet.data.arrays import load_array
from emonet.data.demo import MANIFEST_NAME, make_demo_data
from emonet.monitoring.batches import BATCH_CSV
from emonet.schema import EMOTIONS, annotations_path, arrays_dir
from emonet.utils.io import atomic_path, write_csv_atomic

__all__ = ["DEMO_BATCH_ROWS", "NEGATIVE_EMOTIONS", "write_demo_batches"]

DEMO_BATCH_ROWS = 200
NEGATIVE_EMOTIONS: tuple[str, ...] = ("Anger", "Annoyance", "Disquietment", "Fear", "Pain", "Sadness", "Suffering")
_DARKEN = 0.55


def _write_batch(folder: Path, crops: list[np.ndarray], labels: pd.DataFrame) -> Path:
    (folder / "crops").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, crop in enumerate(crops):
        path = folder / "crops" / f"crop_{i:05d}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(crop).save(tmp, format="PNG")
        paths.append(f"crops/{path.name}")
    table = pd.DataFrame({"image_path": paths, **{e: labels[e].to_numpy(dtype=int) for e in EMOTIONS}})
    return write_csv_atomic(table, folder / BATCH_CSV)


def write_demo_batches(
    out_dir: str | Path, rows: int = DEMO_BATCH_ROWS, seed: int = 7, size: int = 112
) -> dict[str, Path]:
    """Write ``out_dir/like/batch.csv`` and ``out_dir/shifted/batch.csv`` with their PNG crops.

    Each CSV lists ``rows`` crops by ``image_path`` with their 26 emotion labels. Returns
    ``{"like": csv, "shifted": csv}``.
    """
    if rows < 20:
        raise ValueError(f"rows must be >= 20 (the tests need a few dozen crops), got {rows}")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="emonet-demo-batches-") as tmp:
        root = make_demo_data(Path(tmp) / "archive", seed=seed, n_train=1, n_val=1, n_test=3 * rows, size=size)
        table = load_annotations(annotations_path(root, "test"))
        modes = np.array(json.loads((root / MANIFEST_NAME).read_text())["face_modes"]["test"])
        crops = [np.asarray(load_array(arrays_dir(root), name)) for name in table["Crop_name"]]
        like = np.arange(rows)
        pool = np.arange(rows, len(table))
        negative = table[list(NEGATIVE_EMOTIONS)].to_numpy().any(axis=1)[pool]
        weights = np.where(modes[pool] == "absent", 3.0, 1.0) * np.where(negative, 3.0, 1.0)
        shifted = rng.choice(pool, size=rows, replace=False, p=weights / weights.sum())
        dark = [(crops[i].astype(np.float32) * _DARKEN).round().astype(np.uint8) for i in shifted]
        return {
            "like": _write_batch(out_dir / "like", [crops[i] for i in like], table.iloc[like]),
            "shifted": _write_batch(out_dir / "shifted", dark, table.iloc[shifted]),
        }
