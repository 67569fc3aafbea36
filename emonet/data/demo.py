"""A small synthetic archive in the exact EMOTIC layout, with learnable cues and real faces,
so that face visibility, training and evaluation run end to end without the real data.

What the pictures encode (each body crop is cut from its full scene at the person's box):

- **Emotions**: each positive emotion of a person is one disc ("glyph") on the torso,
  about 28% of the crop's side, at a random place in a 2 x 2 grid, with a thin dark
  outline. Each emotion has its own colour (:data:`GLYPHS`): Peace red, Affection
  green, Esteem blue, Anticipation yellow, Engagement cyan, Confidence magenta,
  Happiness white, Pleasure maroon, Excitement dark green, Surprise navy, Sympathy
  olive, Doubt/Confusion teal, Disconnection purple, Fatigue orange, Embarrassment
  rose, Yearning chartreuse, Disapproval spring green, Aversion violet, Annoyance
  azure, Anger salmon, Sensitivity light green, Sadness periwinkle, Disquietment light
  yellow, Fear pink, Pain light cyan, Suffering light grey with black bands. The
  colours are the RGB grid {0, 128, 255}^3 without black and grey: flips, rotations
  and +-20% colour jitter keep them apart (no augmentation changes hue).
- **Valence**: the clothing's hue and brightness, from dark blue-grey (1) through
  green-grey to light orange-grey (10), with a little noise.
- **Arousal**: horizontal stripes on the clothing, wide (1, calm) to narrow (10).
- **Context**: each full image has a mood shared by its persons; it tints the scene's
  background (cool and dark when negative, warm and bright when positive), raises the
  valence of its persons and makes their pleasant emotions likelier.
- **Dominance**: plausible values tied to Confidence/Esteem versus Fear/Embarrassment;
  no visual cue.
- **Faces**: a real photograph (the face of ``skimage.data.astronaut()``, public
  domain, bundled with scikit-image) is fully inside the box on about 40% of the
  persons, cut by the box border on about 20% (MediaPipe's face landmarker finds it
  with part of its landmarks outside the crop: scores of about 79-99), and on the rest
  the head is seen from behind (score 0).

Labels have EMOTIC-like imbalance (Engagement in ~45% of the rows, Happiness and
Anticipation ~20%, Pain, Embarrassment or Fear in 5%), 1 to 4 positives per person;
every emotion has at least 5% of a split's rows (at least 2) as positives in every
split of 13 rows or more, so average precision is defined. The archive's quirks are
reproduced: 2-3 persons share many full images, about 10% of rows have Width/Height
swapped (always where the box overflows the stated width, so readers can tell), crops
are resized to one square size, and about half the full images are stored at half
the size that Width/Height state. A few single-person photos are portrait and cut
2 px inside the person's box, so their correctly stated box overflows the width by
2 px, as annotation tools allow: a reader that trusts the box over the aspect ratio
would wrongly swap them. The manifest lists both kinds of rows.
"""

from __future__ import annotations

import colorsys
import functools
import json
import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from skimage import data as skdata
from skimage import transform
from tqdm.auto import tqdm

from emonet.schema import (
    AGES,
    ANNOTATIONS_DIRNAME,
    CSV_COLUMNS,
    EMOTIONS,
    GENDERS,
    NUM_EMOTIONS,
    SCALE_MAX,
    SCALE_MIN,
    SPLITS,
    annotations_path,
    arrays_dir,
    crop_name,
    image_name,
)
from emonet.utils.io import save_npy_atomic, write_csv_atomic, write_json_atomic

__all__ = ["DEMO_ROWS", "GLYPHS", "MANIFEST_NAME", "MIN_SIZE", "ensure_demo_archive", "example_crop", "make_demo_data"]

logger = logging.getLogger(__name__)

# Rows per split of the demo archive that `make demo`, the demo deployment and `emonet tune`
# use (seed 0), sized with the demo recipe (configs/demo.yaml): for the same training time,
# 2000 rows seen 5 times beat 600 seen 16 times (the rare emotions need more distinct
# examples); 100 validation and test rows keep every emotion's AP defined.
DEMO_ROWS = {"n_train": 2000, "n_val": 100, "n_test": 100}
# Written next to the two archive folders; its presence marks a folder this module may
# overwrite (a real archive has the same file names and must never be clobbered).
MANIFEST_NAME = "demo_manifest.json"
# Below this the glyphs and stripes are a few pixels wide. Faces need larger crops to be
# found by the face landmarker (its detector misses faces under ~30 px, i.e. crops under ~80 px).
MIN_SIZE = 32

# One colour per emotion, in paper order: the 3 x 3 x 3 grid of channel levels
# {0, 128, 255} without black (the rotation fill) and mid-grey (the clothing), plus a
# light-grey disc with black bands (no palette colour in it, told by its texture; a
# checker looked like an eye to the face detector). Neighbours differ by 127 in one
# channel, which colour jitter of +-20% does not bridge, and no augmentation changes hue.
_GLYPH_COLOURS: tuple[tuple[str, tuple[int, int, int] | None], ...] = (
    ("red", (255, 0, 0)),
    ("green", (0, 255, 0)),
    ("blue", (0, 0, 255)),
    ("yellow", (255, 255, 0)),
    ("cyan", (0, 255, 255)),
    ("magenta", (255, 0, 255)),
    ("white", (255, 255, 255)),
    ("maroon", (128, 0, 0)),
    ("dark green", (0, 128, 0)),
    ("navy", (0, 0, 128)),
    ("olive", (128, 128, 0)),
    ("teal", (0, 128, 128)),
    ("purple", (128, 0, 128)),
    ("orange", (255, 128, 0)),
    ("rose", (255, 0, 128)),
    ("chartreuse", (128, 255, 0)),
    ("spring green", (0, 255, 128)),
    ("violet", (128, 0, 255)),
    ("azure", (0, 128, 255)),
    ("salmon", (255, 128, 128)),
    ("light green", (128, 255, 128)),
    ("periwinkle", (128, 128, 255)),
    ("light yellow", (255, 255, 128)),
    ("pink", (255, 128, 255)),
    ("light cyan", (128, 255, 255)),
    ("grey with black bands", None),
)
_STRIPES_GREY = (190, 190, 190)
# Emotion -> colour name of its glyph: the cue documented in the module docstring.
GLYPHS: dict[str, str] = {emotion: _GLYPH_COLOURS[i][0] for i, emotion in enumerate(EMOTIONS)}

# Relative frequencies, roughly those of the EMOTIC train split (percent of persons).
_BASE_FREQUENCY = {
    "Peace": 13, "Affection": 11, "Esteem": 4, "Anticipation": 23, "Engagement": 55,
    "Confidence": 19, "Happiness": 27, "Pleasure": 14, "Excitement": 13, "Surprise": 3,
    "Sympathy": 5, "Doubt/Confusion": 9, "Disconnection": 9, "Fatigue": 4, "Embarrassment": 1,
    "Yearning": 3, "Disapproval": 3, "Aversion": 2, "Annoyance": 4, "Anger": 2,
    "Sensitivity": 2, "Sadness": 5, "Disquietment": 8, "Fear": 1.5, "Pain": 1, "Suffering": 2,
}  # fmt: skip
# How pleasant (valence) and how activated (arousal) each emotion is, in [-1, 1].
_VALENCE_SIGN = {
    "Peace": 0.6, "Affection": 0.8, "Esteem": 0.5, "Anticipation": 0.3, "Engagement": 0.2,
    "Confidence": 0.5, "Happiness": 1.0, "Pleasure": 0.9, "Excitement": 0.7, "Surprise": 0.0,
    "Sympathy": 0.2, "Doubt/Confusion": -0.3, "Disconnection": -0.4, "Fatigue": -0.5,
    "Embarrassment": -0.5, "Yearning": -0.3, "Disapproval": -0.6, "Aversion": -0.7,
    "Annoyance": -0.7, "Anger": -0.9, "Sensitivity": -0.3, "Sadness": -0.9, "Disquietment": -0.6,
    "Fear": -0.8, "Pain": -0.9, "Suffering": -1.0,
}  # fmt: skip
_AROUSAL_SIGN = {
    "Peace": -0.8, "Affection": 0.0, "Esteem": 0.0, "Anticipation": 0.4, "Engagement": 0.3,
    "Confidence": 0.2, "Happiness": 0.4, "Pleasure": 0.1, "Excitement": 1.0, "Surprise": 0.8,
    "Sympathy": -0.2, "Doubt/Confusion": -0.1, "Disconnection": -0.6, "Fatigue": -1.0,
    "Embarrassment": 0.3, "Yearning": -0.2, "Disapproval": 0.2, "Aversion": 0.3, "Annoyance": 0.5,
    "Anger": 0.9, "Sensitivity": 0.0, "Sadness": -0.6, "Disquietment": 0.5, "Fear": 0.8,
    "Pain": 0.5, "Suffering": 0.3,
}  # fmt: skip
_DOMINANCE_SIGN = {"Confidence": 1.0, "Esteem": 0.8, "Anger": 0.5, "Fear": -1.0, "Embarrassment": -0.8, "Pain": -0.6}

_FACE_MODES = ("full", "partial", "absent")
_FACE_PROBS = (0.4, 0.2, 0.4)
_PERSONS_PER_IMAGE = (1, 2, 3)
_PERSONS_PROBS = (0.35, 0.4, 0.25)
_POSITIVES = (1, 2, 3, 4)
_POSITIVES_PROBS = (0.3, 0.3, 0.25, 0.15)
_SWAPPED_SHARE = 0.10  # rows whose Width/Height are stated swapped
# Single-person photos made portrait, with the box overflowing the width by 2 px.
_OVERFLOW_SHARE = 0.3
_OVERFLOW_PX = 2
_PORTRAIT_ASPECT = 1.3  # height / width: clearly portrait, not near-square
# Seeds the overflow choice apart from the main stream, so every label, box and pixel
# drawn from the main stream is the same as without these rows.
_OVERFLOW_STREAM = 1
_HALF_SIZE_SHARE = 0.5  # full images stored at half the stated Width/Height
_MIN_SHARE = 0.05  # rarest emotions are topped up to this share of a split's rows
_GLYPH_SIDE = 0.28  # glyph side as a share of the box width
# Partial faces: share of the head pushed out of the box. Measured with the legacy Face
# Mesh at 112 px: 0.2-0.35 keeps the face detectable with 80-99% of landmarks inside; the
# Tasks face landmarker finds every one of them too, at 79-99% (500 crops, seed 0).
_PARTIAL_CUT = (0.22, 0.33)
# The astronaut's head in skimage.data.astronaut(): forehead to chin, with hair sides.
_FACE_BOX = (40, 196, 158, 292)  # top, bottom, left, right


@functools.lru_cache(maxsize=1)
def _face_photo() -> Image.Image:
    """The face of ``skimage.data.astronaut()`` as an RGBA image with an oval mask."""
    top, bottom, left, right = _FACE_BOX
    face = Image.fromarray(np.ascontiguousarray(skdata.astronaut()[top:bottom, left:right]))
    # A soft-edged oval hides the photo's rectangular background so the head sits on
    # the scene; the face landmarker still finds it (checked in the tests).
    height, width = face.height, face.width
    yy, xx = np.mgrid[0:height, 0:width]
    radius = ((xx - (width - 1) / 2) / (width / 2)) ** 2 + ((yy - (height - 1) / 2) / (height / 2)) ** 2
    alpha = np.clip((1.08 - radius) / 0.12, 0.0, 1.0)
    face.putalpha(Image.fromarray((alpha * 255).astype(np.uint8)))
    return face


def _check_args(seed: int, sizes: dict[str, int], size: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")


def _check_out_dir(out_dir: Path) -> dict[str, Any] | None:
    """Refuse a folder holding an archive this module did not write; return its old manifest."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir exists and is not a folder: {out_dir}")
    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            return json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    existing = sorted((out_dir / ANNOTATIONS_DIRNAME).glob("annot_arrs_*.csv")) if out_dir.is_dir() else []
    if existing:
        raise ValueError(
            f"out_dir already holds an archive not written by make_demo_data ({existing[0]}); "
            "refusing to overwrite it: choose an empty folder"
        )
    return None


def _sample_emotions(rng: np.random.Generator, moods: np.ndarray) -> np.ndarray:
    """Multi-hot labels ``(n, 26)`` with 1-4 positives per row.

    A mood-tilted draw gives the EMOTIC-like imbalance; then the rarest emotions are
    topped up to a few positives (``_MIN_SHARE`` of the rows, at least 2) so that
    average precision is defined in every split and a model sees a few examples.
    """
    n = len(moods)
    base = np.array([_BASE_FREQUENCY[e] for e in EMOTIONS], dtype=np.float64)
    valence_sign = np.array([_VALENCE_SIGN[e] for e in EMOTIONS])
    labels = np.zeros((n, NUM_EMOTIONS), dtype=np.float64)
    for row, wanted in enumerate(rng.choice(_POSITIVES, size=n, p=_POSITIVES_PROBS)):
        weights = base * np.exp(0.8 * moods[row] * valence_sign)
        labels[row, rng.choice(NUM_EMOTIONS, size=wanted, replace=False, p=weights / weights.sum())] = 1.0

    # Rows hold at most 4 positives, so at most 4n // 26 per emotion can be guaranteed.
    min_count = min(max(2, math.ceil(_MIN_SHARE * n)), (4 * n) // NUM_EMOTIONS)
    counts = labels.sum(axis=0)
    for emotion in np.argsort(counts, kind="stable"):
        for _ in range(int(min_count - counts[emotion])):
            free = np.flatnonzero((labels[:, emotion] == 0) & (labels.sum(axis=1) < max(_POSITIVES)))
            if len(free):
                row = int(rng.choice(free))
            else:
                # Every row is full: take the place of a frequent emotion in some row.
                spare = (labels > 0) & (counts > min_count)[None, :] & (labels[:, [emotion]] == 0)
                rows = np.flatnonzero(spare.any(axis=1))
                if not len(rows):
                    break
                row = int(rng.choice(rows))
                dropped = int(np.argmax(np.where(spare[row], counts, -1)))
                labels[row, dropped] = 0.0
                counts[dropped] -= 1
            labels[row, emotion] = 1.0
            counts[emotion] += 1
    return labels


def _affect(rng: np.random.Generator, labels: np.ndarray, moods: np.ndarray) -> np.ndarray:
    """Valence, arousal, dominance ``(n, 3)`` on the 1..10 scale, tied to the labels and mood."""

    def signed_mean(signs: dict[str, float]) -> np.ndarray:
        vector = np.array([signs.get(e, 0.0) for e in EMOTIONS])
        return (labels @ vector) / np.maximum(labels.sum(axis=1), 1.0)

    n = len(labels)
    valence = 5.5 + 2.8 * signed_mean(_VALENCE_SIGN) + 0.8 * moods + rng.normal(0.0, 0.6, n)
    arousal = 5.0 + 3.0 * signed_mean(_AROUSAL_SIGN) + rng.normal(0.0, 0.8, n)
    dominance = 6.0 + 2.0 * signed_mean(_DOMINANCE_SIGN) + rng.normal(0.0, 1.2, n)
    vad = np.stack([valence, arousal, dominance], axis=1)
    return np.round(np.clip(vad, SCALE_MIN, SCALE_MAX), 4)


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value)) * 255.0


def _background(rng: np.random.Generator, width: int, height: int, mood: float) -> np.ndarray:
    """A scene tinted by its mood: cool and dark when negative, warm and bright when positive."""
    t = 1.0 / (1.0 + math.exp(-1.5 * mood))
    top = _hsv(0.62 - 0.52 * t + rng.normal(0, 0.02), 0.25, 0.35 + 0.45 * t)
    bottom = _hsv(0.62 - 0.52 * t + rng.normal(0, 0.02), 0.2, 0.25 + 0.4 * t)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    scene = np.broadcast_to((1 - ramp) * top + ramp * bottom, (height, width, 3)).copy()
    # A few neutral blocks (furniture, windows) so the scene is not a flat gradient.
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 10, width // 3 + 2)), int(rng.integers(height // 10, height // 2 + 2))
        scene[y0 : y0 + h, x0 : x0 + w] = scene[y0 : y0 + h, x0 : x0 + w] * rng.uniform(0.7, 1.2)
    scene += rng.normal(0.0, 6.0, scene.shape)
    return np.clip(scene, 0, 255).astype(np.uint8)


def _draw_glyph(scene: Image.Image, emotion: int, cx: float, cy: float, side: float) -> None:
    """Draw emotion ``emotion``'s glyph: a disc of its colour with a thin dark outline."""
    colour = _GLYPH_COLOURS[emotion][1]
    r = side / 2
    outline = max(1, round(side * 0.06))
    draw = ImageDraw.Draw(scene)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour or _STRIPES_GREY, outline=(40, 40, 40), width=outline)
    if colour is None:
        # Black bands over the inside of the disc: 4 periods across it.
        x0, y0 = math.floor(cx - r), math.floor(cy - r)
        yy, xx = np.mgrid[y0 : math.ceil(cy + r) + 1, x0 : math.ceil(cx + r) + 1] + 0.5
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= (r - outline) ** 2
        band = np.floor((yy - cy) / (side / 8)).astype(int) % 2 == 0
        mask = Image.fromarray(((inside & band) * 255).astype(np.uint8))
        scene.paste((0, 0, 0), (x0, y0, x0 + mask.width, y0 + mask.height), mask)


def _draw_person(
    rng: np.random.Generator,
    scene: Image.Image,
    box: tuple[int, int, int, int],
    labels: np.ndarray,
    valence: float,
    arousal: float,
    face_mode: str,
) -> None:
    """Draw one person (clothing, glyphs, head) into ``scene`` inside ``box``."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    draw = ImageDraw.Draw(scene)

    # Clothing: hue encodes valence, stripe period encodes arousal (see module docstring).
    t_val = (valence - SCALE_MIN) / (SCALE_MAX - SCALE_MIN) + rng.normal(0, 0.03)
    # Low saturation and mid brightness keep the clothing away from every glyph colour.
    colour = _hsv(0.62 - 0.54 * t_val, 0.3, 0.45 + 0.3 * t_val)
    t_aro = float(np.clip((arousal - SCALE_MIN) / (SCALE_MAX - SCALE_MIN) + rng.normal(0, 0.03), 0, 1))
    period = max(2.0, w * (0.30 - 0.25 * t_aro))
    tx0, ty0, tx1, ty1 = x0 + round(0.06 * w), y0 + round(0.42 * h), x1 - round(0.06 * w), y1
    rows = np.arange(ty1 - ty0)[:, None, None]
    dark = ((rows + rng.uniform(0, period)) % period) < period / 2
    torso = np.where(dark, colour * 0.62, colour) + rng.normal(0, 4.0, (ty1 - ty0, tx1 - tx0, 3))
    scene.paste(Image.fromarray(np.clip(torso, 0, 255).astype(np.uint8)), (tx0, ty0))

    # One glyph per positive emotion (at most 4), each in its own cell of a 2 x 2 grid
    # on the torso, at a random place in the cell.
    side = _GLYPH_SIDE * w
    cell_w, cell_h = (tx1 - tx0) / 2, (ty1 - ty0 - 0.02 * h) / 2
    positives = np.flatnonzero(labels)
    cells = rng.choice(4, size=len(positives), replace=False)
    for emotion, cell in zip(positives, cells):
        row, col = divmod(int(cell), 2)
        cx = tx0 + (col + 0.5) * cell_w + rng.uniform(-1, 1) * max(0.0, cell_w - side) / 2
        cy = ty0 + 0.02 * h + (row + 0.5) * cell_h + rng.uniform(-1, 1) * max(0.0, cell_h - side) / 2
        _draw_glyph(scene, int(emotion), cx, cy, side)

    # Head: the astronaut's face, fully inside, cut by the box border, or seen from behind.
    face = _face_photo()
    head_h = rng.uniform(0.36, 0.42) * h
    head_w = head_h * face.width / face.height
    hx = x0 + (w - head_w) / 2 + rng.uniform(-0.08, 0.08) * w
    hy = y0 + 0.02 * h
    if face_mode == "absent":
        hair = _hsv(rng.uniform(0.05, 0.1), rng.uniform(0.4, 0.7), rng.uniform(0.15, 0.4))
        draw.ellipse((hx, hy, hx + head_w, hy + head_h), fill=tuple(int(c) for c in hair))
        return
    if face_mode == "partial":
        cut = rng.uniform(*_PARTIAL_CUT)
        side_cut = int(rng.integers(3))  # 0: top, 1: left, 2: right border of the box
        if side_cut == 0:
            hy = y0 - cut * head_h
        elif side_cut == 1:
            hx = x0 - cut * head_w
        else:
            hx = x1 - (1 - cut) * head_w
    head = face.resize((max(1, round(head_w)), max(1, round(head_h))), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        head = head.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scene.paste(head, (round(hx), round(hy)), head)


def _render_image(
    rng: np.random.Generator,
    size: int,
    labels: np.ndarray,
    vad: np.ndarray,
    face_modes: list[str],
    mood: float,
) -> tuple[np.ndarray, list[tuple[int, int, int, int]], list[np.ndarray]]:
    """One full scene with its persons: the scene, the boxes and the resized body crops."""
    n = len(labels)
    widths = [round(size * rng.uniform(0.95, 1.3)) for _ in range(n)]
    heights = [round(w * rng.uniform(1.0, 1.25)) for w in widths]
    # Margins leave room for faces pushed over the box border (partial faces).
    gap = round(0.3 * size)
    top = round(0.2 * max(heights))
    width = sum(widths) + gap * (n + 1)
    height = top + max(heights) + round(0.12 * size)
    scene = Image.fromarray(_background(rng, width, height, mood))
    boxes = []
    x = gap
    for w, h in zip(widths, heights):
        y = top + int(rng.integers(0, max(heights) - h + round(0.1 * size) + 1))
        boxes.append((x, y, x + w, y + h))
        x += w + gap
    for i, box in enumerate(boxes):
        _draw_person(rng, scene, box, labels[i], vad[i, 0], vad[i, 1], face_modes[i])
    # The archive's crops are cut from the photo and resized to one square size.
    crops = [np.asarray(scene.crop(box).resize((size, size), Image.Resampling.BILINEAR)) for box in boxes]
    return np.asarray(scene), boxes, crops


def _portrait_with_overflowing_box(
    scene: np.ndarray, box: tuple[int, int, int, int]
) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """A portrait photo of a one-person scene whose box overflows its width by 2 px.

    The scene is cut at the box's top and 2 px inside its right edge, then extended
    downwards (the floor's last row repeated) to a clearly portrait aspect. The box
    then fits the swapped size but not the stated one, the trap for a reader that
    trusts the box over the aspect ratio. Returns the photo and the box in it, or None
    when the box's bottom would not lie within the new width (the trap needs it).
    """
    x0, y0, x1, y1 = box
    width = x1 - _OVERFLOW_PX
    if y1 - y0 > width:
        return None
    cut = scene[y0:, :width]
    height = max(cut.shape[0], round(_PORTRAIT_ASPECT * width))
    floor = np.repeat(cut[-1:], height - cut.shape[0], axis=0)
    return np.ascontiguousarray(np.concatenate([cut, floor], axis=0)), (x0, 0, x1, y1 - y0)


def _plan_split(rng: np.random.Generator, n_rows: int) -> list[int]:
    """Persons per full image, summing to ``n_rows``."""
    groups: list[int] = []
    while sum(groups) < n_rows:
        groups.append(min(int(rng.choice(_PERSONS_PER_IMAGE, p=_PERSONS_PROBS)), n_rows - sum(groups)))
    return groups


def _remove_stale(img_dir: Path, old: dict[str, Any] | None, rows: dict[str, int], n_images: int) -> None:
    """Delete arrays a previous demo run wrote that this run no longer references."""
    if not old:
        return
    old_rows = old.get("rows") if isinstance(old.get("rows"), dict) else {}
    # Only the generator's own names are built here, whatever the old manifest holds.
    for split in SPLITS:
        for i in range(rows[split], int(old_rows.get(split, 0))):
            (img_dir / crop_name(split, i)).unlink(missing_ok=True)
    for i in range(n_images, int(old.get("images", 0))):
        (img_dir / image_name(i)).unlink(missing_ok=True)


class _Split(NamedTuple):
    """One generated split: its annotation table and what the manifest records of it."""

    table: pd.DataFrame
    face_modes: list[str]
    swapped_rows: list[int]
    overflowing_rows: list[int]
    n_images: int


def _stored_scene(
    rng: np.random.Generator,
    overflow_rng: np.random.Generator,
    scene: np.ndarray,
    boxes: list[tuple[int, int, int, int]],
    take_overflow: bool,
) -> tuple[np.ndarray, tuple[int, int], bool]:
    """The full image as the archive stores it: the array, the (width, height) its row
    states, and whether it became a portrait whose box overflows the stated width.

    ``take_overflow`` asks for the portrait whatever the draw (the split's first
    eligible photo); ``boxes[0]`` is updated when the portrait is made.
    """
    overflowing = False
    height, width = scene.shape[:2]
    if len(boxes) == 1 and (take_overflow or overflow_rng.random() < _OVERFLOW_SHARE):
        portrait = _portrait_with_overflowing_box(scene, boxes[0])
        if portrait is not None:
            scene, boxes[0] = portrait
            height, width = scene.shape[:2]
            overflowing = True
    # Half of the full images are stored smaller than the photo they annotate:
    # readers must rescale boxes by array shape / (Width, Height).
    if rng.random() < _HALF_SIZE_SHARE:
        half = (width // 2, height // 2)
        scene = np.asarray(Image.fromarray(scene).resize(half, Image.Resampling.BILINEAR))
    return scene, (width, height), overflowing


def _person_record(
    rng: np.random.Generator,
    image_index: int,
    stated_size: tuple[int, int],
    box: tuple[int, int, int, int],
    labels: np.ndarray,
    vad: np.ndarray,
    arr_name: str,
    crop: str,
) -> dict[str, Any]:
    """One annotation row: the person's labels and box in its full image, age and gender drawn."""
    width, height = stated_size
    return {
        "Filename": f"demo_{image_index:06d}.jpg",
        "Width": float(width),
        "Height": float(height),
        "Age": str(rng.choice(AGES, p=(0.1, 0.1, 0.8))),
        "Gender": str(rng.choice(GENDERS, p=(0.55, 0.45))),
        "Valence": vad[0],
        "Arousal": vad[1],
        "Dominance": vad[2],
        **dict(zip(EMOTIONS, labels)),
        "X_min": float(box[0]),
        "Y_min": float(box[1]),
        "X_max": float(box[2]),
        "Y_max": float(box[3]),
        "Arr_name": arr_name,
        "Crop_name": crop,
    }


def _swap_width_height(rng: np.random.Generator, table: pd.DataFrame, n_rows: int) -> list[int]:
    """Swap Width/Height on some rows of ``table`` (in place); returns those rows, sorted.

    The archive does so, but only where the box then overflows the stated width: that
    is how readers detect and undo it.
    """
    eligible = np.flatnonzero((table["X_max"] > table["Height"]).to_numpy())
    n_swap = min(len(eligible), round(_SWAPPED_SHARE * n_rows))
    swapped = rng.choice(eligible, size=n_swap, replace=False) if n_swap else np.array([], dtype=int)
    table.loc[swapped, ["Width", "Height"]] = table.loc[swapped, ["Height", "Width"]].to_numpy()
    return sorted(int(row) for row in swapped)


def _make_split(
    rng: np.random.Generator,
    overflow_rng: np.random.Generator,
    split: str,
    n_rows: int,
    size: int,
    img_dir: Path,
    first_image: int,
    bar: tqdm,
) -> _Split:
    """Render and save a split's full images and crops (numbered from ``first_image``)."""
    groups = _plan_split(rng, n_rows)
    moods = np.repeat(rng.normal(0.0, 1.0, len(groups)), groups)
    labels = _sample_emotions(rng, moods)
    vad = _affect(rng, labels, moods)
    modes = [str(m) for m in rng.choice(_FACE_MODES, size=n_rows, p=_FACE_PROBS)]
    records: list[dict[str, Any]] = []
    overflowing_rows: list[int] = []
    image_index = first_image
    start = 0
    for group in groups:
        part = slice(start, start + group)
        scene, boxes, crops = _render_image(rng, size, labels[part], vad[part], modes[part], float(moods[start]))
        # The first eligible photo of every split is taken, so even a small archive
        # has one such row; later ones by chance.
        scene, stated_size, overflowing = _stored_scene(rng, overflow_rng, scene, boxes, not overflowing_rows)
        if overflowing:
            overflowing_rows.append(start)
        arr_name = image_name(image_index)
        save_npy_atomic(np.ascontiguousarray(scene), img_dir / arr_name)
        for k, (box, crop) in enumerate(zip(boxes, crops)):
            row = start + k
            save_npy_atomic(np.ascontiguousarray(crop), img_dir / crop_name(split, row))
            records.append(
                _person_record(
                    rng, image_index, stated_size, box, labels[row], vad[row], arr_name, crop_name(split, row)
                )
            )
        bar.update(group)
        image_index += 1
        start += group
    table = pd.DataFrame(records, columns=list(CSV_COLUMNS))
    swapped_rows = _swap_width_height(rng, table, n_rows)
    return _Split(table, modes, swapped_rows, overflowing_rows, image_index - first_image)


def _log_summary(out_dir: Path, img_dir: Path, rows: dict[str, int], size: int, splits: dict[str, _Split]) -> None:
    """One log line: rows, images, face placement, the quirks reproduced, disk used."""
    all_modes = [m for split in splits.values() for m in split.face_modes]
    n_swapped = sum(len(split.swapped_rows) for split in splits.values())
    n_overflowing = sum(len(split.overflowing_rows) for split in splits.values())
    megabytes = sum(p.stat().st_size for p in img_dir.glob("*.npy")) / 2**20
    logger.info(
        "wrote demo archive %s: %s rows, %d full images, %d px crops; faces full/partial/absent %d/%d/%d; "
        "%d rows with Width/Height swapped, %d portrait rows whose box overflows by %d px; %.1f MiB of arrays",
        out_dir,
        "/".join(str(rows[s]) for s in SPLITS),
        sum(split.n_images for split in splits.values()),
        size,
        *(all_modes.count(m) for m in _FACE_MODES),
        n_swapped,
        n_overflowing,
        _OVERFLOW_PX,
        megabytes,
    )


def make_demo_data(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = 300,
    n_val: int = 100,
    n_test: int = 100,
    size: int = 112,
) -> Path:
    """Write a small synthetic archive in the EMOTIC layout (see ``EMOTIC_FORMAT.md``).

    The pictures carry cues for every label (documented in the module docstring), so
    a small CNN learns them from a few hundred rows, and a real face photograph on part
    of the crops, so face visibility has real full, partial and absent cases.

    Parameters
    ----------
    out_dir : root of the archive; ``annots_arrs/`` and ``img_arrs/`` are created in
        it, with ``demo_manifest.json`` (seed, sizes, face placement per row). Only the
        generator's own file names are (over)written, and arrays of an earlier demo run
        in the same folder that are no longer referenced are removed.
    seed : the same seed gives byte-identical files.
    n_train, n_val, n_test : rows (persons) per split, each >= 1.
    size : side of the square body crops in pixels, >= ``MIN_SIZE``. Faces are found
        by MediaPipe's face landmarker at the default 112 (not below about 80).

    Returns
    -------
    ``out_dir`` as a ``Path``.

    Raises
    ------
    ValueError : a bad seed, row count or size (the value is named), or an ``out_dir``
        that already holds an archive without a demo manifest (a real archive).

    Examples
    --------
    >>> root = make_demo_data("/tmp/emotic_demo", n_train=30, n_val=10, n_test=10)  # doctest: +SKIP
    >>> load_annotations(annotations_path(root, "train")).shape  # doctest: +SKIP
    (30, 40)
    """
    rows = {"train": n_train, "val": n_val, "test": n_test}
    _check_args(seed, {f"n_{split}": count for split, count in rows.items()}, size)
    out_dir = Path(out_dir)
    old_manifest = _check_out_dir(out_dir)
    img_dir = arrays_dir(out_dir)
    img_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    overflow_rng = np.random.default_rng([seed, _OVERFLOW_STREAM])
    next_image = 0
    splits: dict[str, _Split] = {}
    bar = tqdm(total=sum(rows.values()), desc="demo archive", unit="row", disable=None)
    for split in SPLITS:
        splits[split] = _make_split(rng, overflow_rng, split, rows[split], size, img_dir, next_image, bar)
        next_image += splits[split].n_images
    bar.close()

    _remove_stale(img_dir, old_manifest, rows, next_image)
    # The manifest goes before the CSVs: an interrupted run leaves a folder that the
    # next run may overwrite, never one that looks like a user's archive.
    write_json_atomic(
        {
            "generator": "emonet.data.demo.make_demo_data",
            "seed": int(seed),
            "size": int(size),
            "rows": {split: int(count) for split, count in rows.items()},
            "images": next_image,
            "glyphs": GLYPHS,
            "face_modes": {name: split.face_modes for name, split in splits.items()},
            "swapped_rows": {name: split.swapped_rows for name, split in splits.items()},
            "overflowing_rows": {name: split.overflowing_rows for name, split in splits.items()},
        },
        out_dir / MANIFEST_NAME,
    )
    for split, result in splits.items():
        write_csv_atomic(result.table, annotations_path(out_dir, split))
    _log_summary(out_dir, img_dir, rows, size, splits)
    return out_dir


# Windows (rows, columns) of skimage's 512 x 512 astronaut photo, whose face spans
# columns 179-271 and rows 71-177. "partial" cuts the left ~30% of the face off:
# the face landmarker still finds it and extrapolates the cut landmarks past the border,
# giving 75-85 at every size from 96 to 512 px (checked with mediapipe 1.2.3).
_EXAMPLE_WINDOWS: dict[str, tuple[slice, slice]] = {
    "whole": (slice(20, 420), slice(110, 340)),
    "partial": (slice(20, 420), slice(205, 405)),
    "none": (slice(250, 512), slice(0, 230)),
}


def example_crop(kind: str = "whole", size: int | None = None) -> np.ndarray:
    """A body-like crop of a real photo (``skimage.data.astronaut()``) with a known face.

    For tests, benchmarks and demos: ``"whole"`` holds the whole face (score 100),
    ``"partial"`` a face cut by the left border (score strictly between 0 and 100),
    ``"none"`` the lower body and flag, without a face (score 0).

    Parameters
    ----------
    kind : ``"whole"``, ``"partial"`` or ``"none"``.
    size : if given, the crop is resized to ``size`` x ``size``, as the archive's
        crops are; otherwise it keeps its native size (about 400 x 230).

    Returns
    -------
    np.ndarray
        RGB uint8, shape ``(H, W, 3)``.
    """
    if kind not in _EXAMPLE_WINDOWS:
        raise ValueError(f"kind must be one of {sorted(_EXAMPLE_WINDOWS)}, got {kind!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive integer or None, got {size!r}")
    rows, cols = _EXAMPLE_WINDOWS[kind]
    crop = skdata.astronaut()[rows, cols]
    if size is None:
        return np.ascontiguousarray(crop)
    resized = transform.resize(crop, (size, size), anti_aliasing=True)  # float in [0, 1]
    return np.clip(np.round(resized * 255.0), 0, 255).astype(np.uint8)


def ensure_demo_archive(demo_dir: str | Path) -> Path:
    """The demo archive in ``demo_dir`` (:data:`DEMO_ROWS`, seed 0), generated unless every
    split's annotations are already there; returns its root."""
    demo_dir = Path(demo_dir)
    if all(annotations_path(demo_dir, split).is_file() for split in SPLITS):
        return demo_dir
    return make_demo_data(demo_dir, seed=0, **DEMO_ROWS)
