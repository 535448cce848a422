"""Atomic outputs: a file or a directory appears complete or not at all (temp path, then rename)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "atomic_file"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str | os.PathLike, path: Path, mode: int) -> None:
    """Give ``tmp`` the permissions an ordinary ``open``/``mkdir`` would have, then rename it onto ``path``.

    ``mkstemp``/``mkdtemp`` create owner-only (0600/0700) entries; without this a concept file written here
    could not be read by another user or a server process that reads what a plain write would let it read.
    """
    os.chmod(tmp, mode & ~_umask())
    os.replace(tmp, path)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file next to ``path``; on success it is renamed onto ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        _publish(tmp, path, 0o666)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path``, on error it is removed.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (raised before anything is written).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"Output directory {str(path)!r} already exists; choose another or overwrite it."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            _publish(tmp, path, 0o777)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _publish(tmp, path, 0o777)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
