"""Reading the archive's arrays: only plain files of the image folder, in any memory order."""

from __future__ import annotations

import numpy as np
import pytest

from emonet.arrays import load_array


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
