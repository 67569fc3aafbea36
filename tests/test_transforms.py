"""Tests for the image presets: shapes, dtypes, determinism and the shared flip."""

from __future__ import annotations

import pickle

import pytest
import torch

from emonet.data.dataset import EmoticDataset
from emonet.data.transforms import PairedTransform, SingleTransform, build_transforms
from emonet.schema import IMAGENET_MEAN, IMAGENET_STD, annotations_path, arrays_dir


def _image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def _two_tone(height: int, width: int) -> torch.Tensor:
    """A grey image, bright on the left half and dark on the right."""
    image = torch.full((3, height, width), 50, dtype=torch.uint8)
    image[:, :, : width // 2] = 200
    return image


def _is_flipped(image: torch.Tensor) -> bool:
    half = image.shape[-1] // 2
    return bool(image[..., :half].mean() < image[..., half:].mean())


@pytest.mark.parametrize("train", [True, False])
def test_single_stream_shape_and_dtype(train: bool) -> None:
    transform = build_transforms(48, train=train)
    assert isinstance(transform, SingleTransform)
    out = transform(_image(40, 30))  # not square, smaller than the output
    assert out.shape == (3, 48, 48)
    assert out.dtype == torch.float32
    assert type(out) is torch.Tensor
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("train", [True, False])
def test_two_streams_shapes(train: bool) -> None:
    transform = build_transforms(32, train=train, context_size=56)
    assert isinstance(transform, PairedTransform)
    body, context = transform(_image(40, 30), _image(90, 120, seed=1))
    assert body.shape == (3, 32, 32) and context.shape == (3, 56, 56)
    assert body.dtype == context.dtype == torch.float32
    # Plain tensors, so the default collate stacks them like the one-stream case.
    assert type(body) is torch.Tensor and type(context) is torch.Tensor


def test_eval_normalizes_with_imagenet_statistics() -> None:
    image = torch.full((3, 20, 20), 128, dtype=torch.uint8)
    out = build_transforms(16, train=False)(image)
    expected = torch.tensor([(128 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(out[:, 0, 0], expected)
    torch.testing.assert_close(out, expected[:, None, None].expand(3, 16, 16))


@pytest.mark.parametrize("kwargs", [{"train": False}, {"train": True, "augment": False}])
def test_eval_and_unaugmented_presets_are_deterministic(kwargs: dict) -> None:
    transform = build_transforms(32, **kwargs)
    image = _image(50, 40)
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(1)
    assert torch.equal(first, transform(image))


def test_train_preset_is_random_but_seeded() -> None:
    transform = build_transforms(32, train=True)
    image = _image(50, 40)
    torch.manual_seed(0)
    a = transform(image)
    torch.manual_seed(0)
    assert torch.equal(a, transform(image))
    outputs = [transform(image) for _ in range(5)]
    assert any(not torch.equal(a, other) for other in outputs)


def test_train_preset_flips_about_half_the_time() -> None:
    transform = build_transforms(32, train=True)
    image = _two_tone(32, 32)
    torch.manual_seed(0)
    flips = [_is_flipped(transform(image)) for _ in range(200)]
    assert 60 < sum(flips) < 140


def test_body_and_context_share_the_flip() -> None:
    transform = build_transforms(24, train=True, context_size=40)
    body, context = _two_tone(40, 30), _two_tone(60, 90)  # different sizes and aspect ratios
    torch.manual_seed(0)
    pairs = [tuple(map(_is_flipped, transform(body, context))) for _ in range(60)]
    assert all(b == c for b, c in pairs), pairs
    assert {b for b, _ in pairs} == {True, False}  # both outcomes happened


def test_body_and_context_share_every_random_draw() -> None:
    # The same image in both streams: shared flip, jitter factors and angle give
    # identical outputs; independent draws would not.
    transform = build_transforms(32, train=True, context_size=32)
    image = _image(32, 32)
    torch.manual_seed(3)
    body, context = transform(image, image.clone())
    assert torch.equal(body, context)


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (torch.zeros(3, 8, 8), "uint8"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), r"\(3, H, W\)"),
        (torch.zeros(3, 8, dtype=torch.uint8), r"\(3, H, W\)"),
    ],
)
def test_bad_input_raises(image: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_transforms(16, train=False)(image)
    with pytest.raises(ValueError, match=match):
        build_transforms(16, train=False, context_size=16)(_image(8, 8), image)


@pytest.mark.parametrize("kwargs", [{"image_size": 0}, {"image_size": 16, "context_size": -1}])
def test_bad_sizes_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="size"):
        build_transforms(train=True, **kwargs)


@pytest.mark.parametrize("context_size", [None, 24])
def test_presets_pickle_for_worker_processes(context_size: int | None) -> None:
    transform = build_transforms(16, train=False, context_size=context_size)
    clone = pickle.loads(pickle.dumps(transform))
    inputs = (_image(20, 20),) if context_size is None else (_image(20, 20), _image(30, 40))
    expected, got = transform(*inputs), clone(*inputs)
    if context_size is None:
        expected, got = (expected,), (got,)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


def test_presets_plug_into_the_dataset(fake_archive) -> None:
    dataset = EmoticDataset(
        annotations_path(fake_archive, "train"),
        arrays_dir(fake_archive),
        transform=build_transforms(32, train=True, context_size=48),
        with_context=True,
    )
    item = dataset[1]
    assert item["body"].shape == (3, 32, 32) and item["context"].shape == (3, 48, 48)
    assert item["body"].dtype == torch.float32
