"""Atomic writes: a file appears complete under its final name, or not at all.

Every writer goes through :func:`atomic_path`: write to a temporary file in the destination's
own directory (so the final rename never crosses file systems), flush and ``fsync`` it, then
``os.replace`` it onto the destination. On any failure (an exception inside the block, a full
disk, Ctrl-C) the temporary file is removed and an existing destination is left untouched.

Usable by any part of salm-fast (checkpoints, reports, releases)::

    with atomic_path("out/model.pt") as tmp:
        torch.save(state, tmp)
    atomic_write_json("out/summary.json", {"auc": 0.71})
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UnwritableOutputError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "check_writable", "check_writable_dir",
           "fsync_dir"]


def check_writable(path: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
    """Check up front that ``path`` can be created (or replaced) as a file; return it as a Path.

    Raises :class:`UnwritableOutputError` (one line) if its directory is missing, not a
    directory, or not writable, if ``path`` is itself a directory, or if it exists and
    ``overwrite`` is false.
    """
    path = Path(path)
    check_writable_dir(path.parent, path)
    if path.is_dir():
        raise UnwritableOutputError(f"{path}: is a directory, cannot write a file there")
    if path.exists() and not overwrite:
        raise UnwritableOutputError(f"{path}: already exists (pass overwrite=True to replace it)")
    return path


def check_writable_dir(directory: str | os.PathLike[str], for_path: str | os.PathLike[str] | None = None) -> Path:
    """Check that ``directory`` exists, is a directory and is writable; raise UnwritableOutputError if not.

    ``for_path`` (the file or folder about to be written there) prefixes the message.
    """
    directory = Path(directory)
    who = f"{for_path}: " if for_path is not None else ""
    if not directory.exists():
        raise UnwritableOutputError(f"{who}output directory {directory} does not exist")
    if not directory.is_dir():
        raise UnwritableOutputError(f"{who}{directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UnwritableOutputError(f"{who}output directory {directory} is not writable")
    return directory


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Flush a directory entry (a rename) to disk; a no-op where the OS does not support it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it (setting os.umask to read it would race threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _make_temp(path: Path) -> Path:
    # Same directory as the destination; keeps the real suffix last so that writers which
    # append an extension (np.savez adds ".npz") do not rename the temporary file.
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as e:
        raise UnwritableOutputError(f"{path}: cannot create a file in {path.parent}: {e.strerror or e}") from None
    os.close(fd)
    return Path(tmp)


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    The caller writes the whole file to the yielded path (by name: ``np.savez``,
    ``torch.save``, ``PIL.Image.save``...). If the block raises, the temporary file is
    removed and ``path`` is untouched. The final file gets the usual permissions
    (0o666 minus umask), not ``mkstemp``'s 0o600; a replaced file keeps its own mode.
    """
    path = check_writable(path, overwrite=overwrite)
    tmp = _make_temp(path)
    try:
        yield tmp
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if not overwrite and path.exists():
            raise UnwritableOutputError(f"{path}: appeared while writing; not replaced")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically; return the path."""
    data = bytes(data)
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def json_safe(obj: Any) -> Any:
    """``obj`` with what strict JSON cannot hold made plain: NaN/inf floats -> None, NumPy
    scalars and arrays -> Python numbers and lists, tensors -> lists, tuples -> lists, paths
    -> strings. The one place this conversion happens."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy scalars / arrays, torch tensors
        return json_safe(obj.tolist())
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2,
                      overwrite: bool = True) -> Path:
    """Serialize ``json_safe(obj)`` as strict JSON (UTF-8, trailing newline) and write it atomically;
    return the path.

    Serialization happens before anything touches the disk, so an object that is not
    JSON-serializable raises ``TypeError`` and writes nothing. NaN/inf are written as null.
    """
    text = json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)
