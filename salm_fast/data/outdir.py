"""An output folder written as a whole: an exclusive lock, a private staging folder, one rename.

A run that writes a folder of files (a release beside its summary and figure) must never leave
a half-written folder, nor let two runs mix their files in it:

* :func:`output_lock` holds an exclusive ``flock`` on ``<parent>/.<name>.lock`` for the whole run;
  a second run refuses at once (:class:`OutputInUseError`) instead of waiting or interleaving;
* :func:`make_staging_dir` makes a private folder beside the destination (same file system, so
  the final rename never copies), where the run writes everything;
* :func:`publish_dir` moves the staged folder onto the destination in one rename; an existing
  destination is renamed aside first, replaced, and deleted only once the new one is in place.

A failure before the publish leaves the destination untouched (the caller removes the staging
folder). POSIX only (``flock``, renaming a directory onto an empty one).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .atomic import _umask, fsync_dir
from .errors import OutputInUseError, UnwritableOutputError

__all__ = ["lock_path", "make_staging_dir", "output_lock", "publish_dir"]


def lock_path(folder: str | os.PathLike[str]) -> Path:
    """The lock file of ``folder``: beside it, so that publishing the folder never touches it."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def output_lock(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (which need not exist; its parent must) while the block runs.

    Raises :class:`OutputInUseError` at once if another process holds it. The lock file is
    removed on release; a process that opened it just before is detected (its file is no longer
    the one at the path) and retries on the new file, so two runs never both hold the lock.
    """
    import fcntl  # POSIX; imported here so that the package still imports elsewhere

    folder = Path(folder)
    path = lock_path(folder)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise UnwritableOutputError(f"{folder}: cannot create the lock file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputInUseError(f"{folder}: another run is writing this output (it holds {path}); "
                                   "wait for it to finish or choose another output folder") from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the previous holder removed the file we locked: lock the one there now
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still locked: nobody can hold the old file afterwards
        os.close(fd)


def make_staging_dir(folder: str | os.PathLike[str], tag: str = "tmp") -> Path:
    """A new empty folder ``<parent>/.<name>.<tag>-XXXX`` beside ``folder``, with the usual folder mode
    (0o777 minus umask, not ``mkdtemp``'s 0o700, which the published folder would otherwise keep)."""
    folder = Path(folder)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{tag}-", dir=folder.parent))
    except OSError as e:
        raise UnwritableOutputError(f"{folder}: cannot create a folder in {folder.parent}: {e.strerror or e}") from None
    os.chmod(staging, 0o777 & ~_umask())
    return staging


def publish_dir(staging: str | os.PathLike[str], folder: str | os.PathLike[str]) -> None:
    """Move the complete folder ``staging`` onto ``folder`` (a sibling) in one rename.

    A missing or empty ``folder`` is replaced atomically. A non-empty one is renamed aside,
    the new one renamed in (the old one is put back if that fails) and the old one deleted.
    """
    staging, folder = Path(staging), Path(folder)
    if folder.is_dir() and any(folder.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.replace(folder, old)
        try:
            os.replace(staging, folder)
        except BaseException:
            os.replace(old, folder)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, folder)  # POSIX rename replaces a missing or empty directory
    fsync_dir(folder.parent)
