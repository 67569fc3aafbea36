"""Cache keys of the data tasks: they change when a file or the code behind a result
changes, and only then."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import tasks.caching as caching
from emonet.schema import annotations_path, arrays_dir, crop_name
from tasks.caching import code_digest, content_digest, module_digest, stat_digest


def test_content_digest_follows_bytes_not_names_or_times(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_bytes(b"x,y\n1,2\n")
    b.write_bytes(b"x,y\n1,2\n")
    os.utime(b, ns=(1, 1))
    assert content_digest(a) == content_digest(b)
    b.write_bytes(b"x,y\n1,3\n")
    assert content_digest(a) != content_digest(b)
    big = tmp_path / "big.bin"  # more than one read block
    big.write_bytes(bytes(range(256)) * 10_000)
    assert content_digest(big) != content_digest(a)


def test_stat_digest_follows_size_time_and_presence(tmp_path):
    paths = [tmp_path / "a.npy", tmp_path / "b.npy"]
    for path in paths:
        path.write_bytes(b"12345")
        os.utime(path, ns=(10**18, 10**18))
    first = stat_digest(paths)
    assert stat_digest(paths) == first
    os.utime(paths[1], ns=(10**18 + 1, 10**18 + 1))
    touched = stat_digest(paths)
    assert touched != first
    paths[1].write_bytes(b"123456")
    os.utime(paths[1], ns=(10**18 + 1, 10**18 + 1))
    assert stat_digest(paths) not in {first, touched}
    paths[1].unlink()
    missing = stat_digest(paths)
    assert missing not in {first, touched}
    assert stat_digest(paths[::-1]) != missing  # order counts


def test_code_digest_follows_the_source_of_each_module(tmp_path, monkeypatch):
    # A rule changed in a module's source changes the digest; a reload is not needed.
    module = tmp_path / "probe_rules.py"
    module.write_text("MIN_VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "probe_rules", raising=False)
    before = code_digest(["emonet.schema", "probe_rules"])
    assert code_digest(["emonet.schema", "probe_rules"]) == before
    module.write_text("MIN_VALUE = 2\n")
    assert code_digest(["emonet.schema", "probe_rules"]) != before
    assert code_digest(["probe_rules", "emonet.schema"]) != code_digest(["emonet.schema", "probe_rules"])
    assert module_digest("probe_rules") == content_digest(module)


def test_module_without_a_source_file_is_refused():
    with pytest.raises(ValueError, match="'sys' has no source file"):
        module_digest("sys")


@pytest.mark.parametrize("changed", ["emonet.data.annotations", "emonet.data.arrays", "emonet.schema"])
def test_validation_array_and_schema_code_is_in_both_keys(fake_archive, monkeypatch, changed):
    assert changed in caching.VISIBILITY_MODULES and changed in caching.NORMALIZE_MODULES
    shard = {"annotations_csv": annotations_path(fake_archive, "val"), "img_dir": arrays_dir(fake_archive)}
    shard.update(start=0, stop=3)
    splits = {"csv_paths": {split: annotations_path(fake_archive, split) for split in ("train", "val")}}
    before = caching._visibility_shard_key(None, shard), caching._csv_contents_key(None, splits)

    real_digest = caching.module_digest
    # A rule changed in one module: its source digest differs.
    monkeypatch.setattr(
        caching, "module_digest", lambda name: real_digest(name) + ("-changed" if name == changed else "")
    )
    after = caching._visibility_shard_key(None, shard), caching._csv_contents_key(None, splits)
    assert after[0] != before[0] and after[1] != before[1]


def test_visibility_shard_key_follows_the_csv_and_the_shard_crops_only(fake_archive):
    img_dir = arrays_dir(fake_archive)
    shard = {"annotations_csv": annotations_path(fake_archive, "val"), "img_dir": img_dir, "start": 0, "stop": 3}
    key = caching._visibility_shard_key(None, shard)
    assert caching._visibility_shard_key(None, shard) == key

    # A crop outside rows [0, 3) changes nothing; one inside changes the key.
    np.save(img_dir / crop_name("val", 4), np.zeros((8, 8, 3), np.uint8))
    assert caching._visibility_shard_key(None, shard) == key
    np.save(img_dir / crop_name("val", 1), np.zeros((8, 8, 3), np.uint8))
    changed_crop = caching._visibility_shard_key(None, shard)
    assert changed_crop != key
    assert caching._visibility_shard_key(None, {**shard, "start": 3, "stop": 6}) != changed_crop

    csv_path = Path(shard["annotations_csv"])
    csv_path.write_text(csv_path.read_text().replace("Adult", "Kid", 1))
    assert caching._visibility_shard_key(None, shard) != changed_crop


def test_csv_contents_key_follows_contents_not_paths(fake_archive, tmp_path):
    train = annotations_path(fake_archive, "train")
    copy = tmp_path / "copy.csv"
    copy.write_bytes(train.read_bytes())
    key = caching._csv_contents_key(None, {"csv_paths": {"train": train}})
    assert caching._csv_contents_key(None, {"csv_paths": {"train": copy}}) == key
    assert caching._csv_contents_key(None, {"csv_paths": {"val": copy}}) != key
    copy.write_text(copy.read_text().replace("Adult", "Kid", 1))
    assert caching._csv_contents_key(None, {"csv_paths": {"train": copy}}) != key
