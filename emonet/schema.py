"""The EMOTIC archive's schema: column names, emotion order, scales and file layout.

Everything that names a column, an emotion or a scale bound imports it from here,
so the paper's emotion order is written down exactly once.
"""

from __future__ import annotations

from pathlib import Path

# The 26 categories in the EMOTIC paper's order (Kosti et al., TPAMI 2019), which is
# also the CSV's column order. Other code and the .mat annotations sort them
# alphabetically: never mix the two orders.
EMOTIONS: tuple[str, ...] = (
    "Peace",
    "Affection",
    "Esteem",
    "Anticipation",
    "Engagement",
    "Confidence",
    "Happiness",
    "Pleasure",
    "Excitement",
    "Surprise",
    "Sympathy",
    "Doubt/Confusion",
    "Disconnection",
    "Fatigue",
    "Embarrassment",
    "Yearning",
    "Disapproval",
    "Aversion",
    "Annoyance",
    "Anger",
    "Sensitivity",
    "Sadness",
    "Disquietment",
    "Fear",
    "Pain",
    "Suffering",
)
NUM_EMOTIONS = len(EMOTIONS)

META_COLUMNS: tuple[str, ...] = ("Filename", "Width", "Height", "Age", "Gender")
VAD_COLUMNS: tuple[str, ...] = ("Valence", "Arousal", "Dominance")
BOX_COLUMNS: tuple[str, ...] = ("X_min", "Y_min", "X_max", "Y_max")
ARRAY_COLUMNS: tuple[str, ...] = ("Arr_name", "Crop_name")

# The 40 columns of annot_arrs_<split>.csv, in the archive's order.
CSV_COLUMNS: tuple[str, ...] = META_COLUMNS + VAD_COLUMNS + EMOTIONS + BOX_COLUMNS + ARRAY_COLUMNS

AGES: tuple[str, ...] = ("Kid", "Teenager", "Adult")
GENDERS: tuple[str, ...] = ("Male", "Female")

# Continuous dimensions are annotated on a 1..10 scale.
SCALE_MIN = 1.0
SCALE_MAX = 10.0

# Columns the pipeline adds.
FACE_VISIBILITY_COLUMN = "Face_Visibility"
VALENCE_NORM_COLUMN = "Valence_norm"
AROUSAL_NORM_COLUMN = "Arousal_norm"
# The model predicts valence and arousal (not dominance), as the original project did.
AFFECT_COLUMNS: tuple[str, ...] = ("Valence", "Arousal")
AFFECT_NORM_COLUMNS: tuple[str, ...] = (VALENCE_NORM_COLUMN, AROUSAL_NORM_COLUMN)

SPLITS: tuple[str, ...] = ("train", "val", "test")
OPTIONAL_SPLITS: tuple[str, ...] = ("extra_train",)

# torchvision's ImageNet statistics, which the pretrained backbones expect.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

ANNOTATIONS_DIRNAME = "annots_arrs"
ARRAYS_DIRNAME = "img_arrs"


def annotations_filename(split: str) -> str:
    """File name of a split's annotation CSV in the archive, e.g. ``annot_arrs_train.csv``."""
    return f"annot_arrs_{split}.csv"


def normalized_filename(split: str) -> str:
    """File name of a split's CSV after affect normalization."""
    return f"normalized_dataset_{split}.csv"


def annotations_path(data_root: str | Path, split: str) -> Path:
    """Path of a split's annotation CSV under an archive root."""
    return Path(data_root) / ANNOTATIONS_DIRNAME / annotations_filename(split)


def arrays_dir(data_root: str | Path) -> Path:
    """Folder of the ``.npy`` image arrays under an archive root."""
    return Path(data_root) / ARRAYS_DIRNAME


def crop_name(split: str, row_index: int) -> str:
    """The archive's body-crop file name for a row of a split."""
    return f"crop_arr_{split}_{row_index}.npy"


def image_name(image_index: int) -> str:
    """The archive's full-image file name; the index is global across splits."""
    return f"img_arr_{image_index}.npy"
