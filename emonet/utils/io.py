"""Safe file handling for every command: atomic writes (every output goes to a temporary
file in the target folder and is renamed into place, so an interrupted run never leaves a
half-written file), the guard that no output is one of the inputs, an early check that
outputs can be written, and CSV reading that names a file that is not a CSV."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import mmap
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

PathLike = str | os.PathLike


# --------------------------------------------------------------------------- guards


def _labelled(paths: Mapping[str, object] | Iterable[object], label: str) -> list[tuple[str, Path]]:
    items = paths.items() if isinstance(paths, Mapping) else ((label, path) for path in paths)
    # None and in-memory objects (a Predictor, a normalizer) are not files: nothing to compare.
    return [(name, Path(path)) for name, path in items if isinstance(path, (str, os.PathLike))]


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same file: the same real path once symlinks and
    ``..`` are resolved (also when neither exists yet), or the same inode (a hard link,
    a case-insensitive file system)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): not the same file
        return False


def check_not_inputs(
    outputs: Mapping[str, PathLike | None] | Iterable[PathLike | None],
    inputs: Mapping[str, object] | Iterable[object],
    *,
    image_dir: PathLike | None = None,
    image_files: Iterable[PathLike] = (),
) -> None:
    """Refuse to write over an input: raise ``ValueError`` if an output is the same file
    as an input, or as another output (see :func:`same_file`), or one of the images read.

    Every command calls this before any work, so an input is never overwritten, however
    the output is spelled (the same path, a symlink, ``..``, a hard link).

    Parameters
    ----------
    outputs, inputs : paths, or mappings of a name for the message (``"out_csv"``) to a
        path. ``None`` and entries that are not paths (an in-memory object, e.g. a
        :class:`~emonet.inference.predictor.Predictor` given instead of a checkpoint) are skipped.
    image_dir : the folder the command reads images from (the archive's ``img_arrs``).
        No output may lie inside it, nor be a hard link to a file in it.
    image_files : images the command reads from elsewhere (an ``image_path`` column),
        iterated only when an output already exists (only an existing file can be
        overwritten). No output may be one of them.

    Raises
    ------
    ValueError
        Naming both paths (and their names).
    """
    outputs_, inputs_ = _labelled(outputs, "output"), _labelled(inputs, "input")
    for index, (out_name, out_path) in enumerate(outputs_):
        for in_name, in_path in inputs_:
            if same_file(out_path, in_path):
                raise ValueError(
                    f"{out_name} {out_path} must differ from the input {in_name} {in_path}: it is the same file "
                    "(inputs are never overwritten)"
                )
        for other_name, other_path in outputs_[index + 1 :]:
            if same_file(out_path, other_path):
                raise ValueError(f"{out_name} {out_path} and {other_name} {other_path} are the same file")
    if image_dir is not None:
        _check_outside_image_dir(outputs_, Path(image_dir))
    existing = [(name, path, path.stat()) for name, path in outputs_ if path.is_file()]
    if existing:
        listed = {_identity(path) for path in image_files} - {None}
        for name, path, stat in existing:
            if (stat.st_dev, stat.st_ino) in listed:
                raise ValueError(
                    f"{name} {path} is one of the images this command reads (inputs are never overwritten)"
                )


def _check_outside_image_dir(outputs: list[tuple[str, Path]], image_dir: Path) -> None:
    folder = image_dir.resolve()
    linked: set[tuple[int, int]] | None = None
    for name, path in outputs:
        if path.resolve().is_relative_to(folder):
            raise ValueError(
                f"{name} {path} lies inside the image folder {image_dir}: outputs never go among the images read"
            )
        try:
            stat = path.stat()
        except OSError:
            continue  # not there yet: it cannot be a hard link to an image
        if stat.st_nlink > 1:
            if linked is None:  # a scan of the folder's inodes, needed only for a hard-linked output
                linked = {(stat.st_dev, entry.inode()) for entry in os.scandir(folder)}
            if (stat.st_dev, stat.st_ino) in linked:
                raise ValueError(
                    f"{name} {path} is a hard link to an image in {image_dir} (inputs are never overwritten)"
                )


def _identity(path: PathLike) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except (OSError, ValueError):  # missing, or not a valid path (a NUL byte): not overwritable
        return None
    return stat.st_dev, stat.st_ino


def ensure_writable_dir(folder: PathLike) -> Path:
    """Create ``folder`` if needed and check that files can be created in it.

    Called before long work, so a read-only or misspelled output folder fails at once
    instead of after the work is done. The check creates and removes a temporary file:
    the only test that also holds for root, network and read-only-mounted file systems
    (``os.access`` answers yes to root on a read-only folder).

    Raises
    ------
    NotADirectoryError
        ``folder`` or one of its parents is a file.
    PermissionError, OSError
        The folder cannot be created or written.

    Every error has ``folder`` as its ``filename``.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(errno.ENOTDIR, "the output folder is a file", str(folder)) from None
    except OSError as error:
        raise type(error)(error.errno, f"cannot create the output folder: {error.strerror}", str(folder)) from None
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise type(error)(error.errno, f"cannot write in the output folder: {error.strerror}", str(folder)) from None
    return folder


def read_csv(path: PathLike, **kwargs: Any) -> Any:
    """``pandas.read_csv`` that names ``path`` when the file is not a text CSV.

    pandas reports a binary file (an image, a checkpoint) as a bare ``UnicodeDecodeError``
    or ``ParserError`` without the file name; here they become ``ValueError("<path>: not a
    CSV file: ...")``, also when they happen in a later chunk (``chunksize``).
    ``EmptyDataError`` passes through for the caller's own message.
    """
    _check_parseable(path)
    try:
        result = pd.read_csv(path, **kwargs)
    except (UnicodeDecodeError, pd.errors.ParserError) as error:
        raise ValueError(f"{path}: not a CSV file: {error}") from None
    if kwargs.get("chunksize") is not None or kwargs.get("iterator"):
        return _named_chunks(result, path)
    return result


# Two inputs crash pandas 2.3's C parser (a segmentation fault, no exception), so they are
# refused before it sees them: NUL bytes (with quotes about, they corrupt its tokenizer;
# a text CSV holds none, a binary file does), and a field that starts as a number whose
# exponent has 10 or more digits (possibly quoted, whatever follows): an exponent of 2**31
# or more, e.g. "3E2147483648", crashes its number parser, and no real value needs one.
_EXPONENT_OVERFLOW = re.compile(rb'(?:^|[,\n"])\s*[+-]?(?:\d+\.?\d*|\.\d+)[eE][+-]?\d{10,}')
# Its tail alone: about 8 times faster to search for than the whole pattern (which is tried
# at every byte), and so rare that the whole pattern is then tried on few lines.
_LONG_EXPONENT = re.compile(rb"[eE][+-]?\d{10,}")


def _check_parseable(path: PathLike) -> None:
    """Refuse, before pandas parses it, a CSV holding what would crash pandas (see above)."""
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            nul_at = data.find(b"\x00")
            match = _find_exponent_overflow(data) if nul_at < 0 else None
            number = match.group().strip(b',\n" ').decode("ascii", "replace") if match is not None else None
    except (OSError, ValueError):  # missing, a folder, or empty (mmap refuses 0 bytes): pandas says
        return
    if nul_at >= 0:
        raise ValueError(f"{path}: not a CSV file: a NUL byte at offset {nul_at} (binary data)")
    if number is not None:
        raise ValueError(f"{path}: not a valid CSV number: {number[:40]!r} (an exponent of 10 or more digits)")


def _find_exponent_overflow(data: mmap.mmap) -> re.Match[bytes] | None:
    """The first field :data:`_EXPONENT_OVERFLOW` matches, tried only on lines with a long exponent."""
    for tail in _LONG_EXPONENT.finditer(data):
        # From the newline before (kept: the pattern's field start), or the file's start.
        match = _EXPONENT_OVERFLOW.search(data, max(data.rfind(b"\n", 0, tail.start()), 0), tail.end())
        if match is not None:
            return match
    return None


def _named_chunks(reader: Any, path: PathLike) -> Iterator[pd.DataFrame]:
    with reader:
        try:
            yield from reader
        except (UnicodeDecodeError, pd.errors.ParserError) as error:
            raise ValueError(f"{path}: not a CSV file: {error}") from None


# --------------------------------------------------------------------------- atomic writes


def _read_umask() -> int:
    # The only portable way to read the umask is to set it; done once, at import, so
    # no thread can create a file while it is briefly 0.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _temp_affixes(name: str) -> tuple[str, str]:
    """Prefix and suffix of :func:`atomic_path`'s temporary files for a file called ``name``."""
    return f".{name}.", ".tmp"


def atomic_temp_files(folder: PathLike, name: str) -> list[Path]:
    """The temporary files :func:`atomic_path` left in ``folder`` for ``folder/name``
    (``.<name>.<8 random characters>.tmp``), which a killed process cannot remove.

    Only names ``tempfile.mkstemp`` can have made with those affixes match, so no other
    file is ever listed.
    """
    prefix, suffix = _temp_affixes(name)
    # mkstemp draws 8 characters from [a-z0-9_] (tempfile._RandomNameSequence).
    pattern = re.compile(re.escape(prefix) + r"[a-z0-9_]{8}" + re.escape(suffix))
    candidates = Path(folder).glob(f"{glob.escape(prefix)}*{suffix}")
    return sorted(path for path in candidates if pattern.fullmatch(path.name) and path.is_file())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary file lives in the same folder so that the final ``os.replace`` is
    atomic on POSIX file systems. On error the temporary file is removed and ``path``
    is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temp_affixes(path.name)
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    # mkstemp creates the file as 0600; give the result the usual umask-based mode so
    # other users and services (an MLflow server, a web server) can read it.
    os.chmod(tmp_name, 0o666 & ~_UMASK)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a file for writing that appears at ``path`` only once it is complete."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle


def write_csv_atomic(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` as CSV without the pandas index column, atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def write_json_atomic(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return Path(path)


def save_npy_atomic(array: np.ndarray, path: str | Path) -> Path:
    """Save one array as ``.npy``, atomically."""
    with atomic_open(path, "wb") as handle:
        np.save(handle, array)
    return Path(path)


def save_figure_atomic(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG, atomically, and close it to free its memory.

    A figure with a layout engine (``layout="constrained"``) already fits its canvas and
    is drawn once; others are cropped to their content (``bbox_inches="tight"``), which
    costs a second full draw.
    """
    import matplotlib.pyplot as plt

    bbox = None if fig.get_layout_engine() is not None else "tight"
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches=bbox, format="png")
    finally:
        plt.close(fig)
    return Path(path)
