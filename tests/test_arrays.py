"""Reading the archive's arrays: only plain files of the image folder, in any memory order."""

from __future__ import annotations

import numpy as np
import pytest

from emonet.data.arrays import load_array


@pytest.fixture
def folders(tmp_path):
    img_dir, outside = tmp_path / "img_arrs", tmp_path / "outside"
    img_dir.mkdir()
    outside.mkdir()
    np.save(outside / "secret.npy", np.zeros((4, 4, 3), np.uint8))
    np.save(img_dir / "crop.npy", np.ones((4, 4, 3), np.uint8))
    return img_dir, outside


def test_link_leaving_the_image_folder_is_refused(folders):
    img_dir, outside = folders
    (img_dir / "escape.npy").symlink_to(outside / "secret.npy")
    (img_dir / "relative.npy").symlink_to("../outside/secret.npy")
    (img_dir / "dangling.npy").symlink_to(outside / "nothing.npy")
    for name in ("escape.npy", "relative.npy", "dangling.npy"):
        with pytest.raises(ValueError, match=rf"{name}: a symbolic link that leads outside the image folder"):
            load_array(img_dir, name)


def test_link_through_a_linked_folder_is_refused(folders):
    # A link to a folder outside, then a file inside it: the real path leaves img_arrs.
    img_dir, outside = folders
    (img_dir / "sub").symlink_to(outside, target_is_directory=True)
    (img_dir / "via_folder.npy").symlink_to(img_dir / "sub" / "secret.npy")
    with pytest.raises(ValueError, match="outside the image folder"):
        load_array(img_dir, "via_folder.npy")


def test_links_inside_the_image_folder_and_a_linked_folder_are_read(folders, tmp_path):
    img_dir, _ = folders
    (img_dir / "alias.npy").symlink_to("crop.npy")
    assert np.asarray(load_array(img_dir, "alias.npy")).sum() == 4 * 4 * 3
    # The image folder itself may be a link (e.g. to a mounted disk).
    linked_dir = tmp_path / "linked_img_arrs"
    linked_dir.symlink_to(img_dir, target_is_directory=True)
    assert np.asarray(load_array(linked_dir, "alias.npy")).sum() == 4 * 4 * 3


def test_fortran_order_array_is_read_with_its_values(tmp_path):
    image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    np.save(tmp_path / "f.npy", np.asfortranarray(image))
    array = load_array(tmp_path, "f.npy")
    assert array.flags["F_CONTIGUOUS"]
    np.testing.assert_array_equal(array, image)


@pytest.mark.parametrize("order", ["C", "F"])
def test_small_files_read_at_once_equal_the_mapped_ones(tmp_path, order):
    image = np.asarray(np.random.default_rng(0).integers(0, 256, (6, 9, 3)), dtype=np.uint8, order=order)
    np.save(tmp_path / "a.npy", image)
    mapped = load_array(tmp_path, "a.npy")
    read = load_array(tmp_path, "a.npy", mmap_min_bytes=1 << 20)
    assert isinstance(mapped, np.memmap) and not isinstance(read, np.memmap)
    np.testing.assert_array_equal(read, image)
    np.testing.assert_array_equal(mapped, image)
    assert read.flags["F_CONTIGUOUS"] == (order == "F")


def test_small_file_whose_header_lies_is_refused_before_allocating(tmp_path):
    # The header declares 100000 x 100000 x 3 (30 GB); the file holds a few bytes.
    path = tmp_path / "liar.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(100_000, 100_000, 3))
    del array
    with open(path, "r+b") as handle:
        handle.truncate(200)
    with pytest.raises(ValueError, match=r"liar\.npy.*more than the file holds"):
        load_array(tmp_path, "liar.npy", mmap_min_bytes=1 << 20)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((4, 5), np.uint8), r"H x W x 3.*\(4, 5\)"),
        (np.zeros((4, 5, 3), np.float32), "uint8, got float32"),
        (np.array([[[None, None, None]]], dtype=object), "cannot read"),
    ],
    ids=["gray", "float", "object"],
)
def test_small_files_read_at_once_are_checked(tmp_path, array, match):
    np.save(tmp_path / "bad.npy", array, allow_pickle=True)
    with pytest.raises(ValueError, match=match):
        load_array(tmp_path, "bad.npy", mmap_min_bytes=1 << 20)
