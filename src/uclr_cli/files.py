"""Atomic file writes: a hidden temporary sibling, fsync, rename into place.

Every output file of uclr (checkpoints, JSON, parquet, PNG) goes through
:func:`atomic_write`, so a kill, Ctrl-C or full disk leaves the old file or
the new one, never half of one, and an OS error is one line naming the file.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from uclr_cli.errors import UclrError, os_reason


def temporary_sibling(path: Path) -> Path:
    """``.<name>.tmp-<pid>``: hidden, and recognised as a leftover of this process by the run lock."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(
    path: str | Path, write: Callable[[Path], None], what: str = "file", error: type[UclrError] = UclrError
) -> None:
    """Call ``write(tmp)``, fsync ``tmp``, rename it to ``path``; on any failure remove ``tmp``, keep the old file.

    An ``OSError`` becomes ``error("cannot write <what>: <reason>", path)``.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        _remove(tmp)
        if isinstance(e, OSError) or is_io_error(e):  # disk full, read-only, permissions; also from Polars
            reason = os_reason(e)
            broken = next((p for p in (path, path.parent) if p.is_symlink() and not p.exists()), None)
            if broken is not None:
                reason, path = "a broken or looping symbolic link is in the way", broken
            raise error(f"cannot write {what}: {reason}", path) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def is_io_error(e: BaseException) -> bool:
    """An OS error reported by a library as its own exception (Polars' ComputeError, a SafetensorError)."""
    return isinstance(e, OSError) or _IO_ERROR.search(str(e)) is not None


_IO_ERROR = re.compile(r"\b(?:io|i/o) error\b|\(os error \d+\)", re.IGNORECASE)


def _remove(tmp: Path) -> None:
    """Remove a temporary file; where that fails too (e.g. its parent is not a folder) there is nothing to remove."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def check_writable(path: str | Path, what: str = "file", error: type[UclrError] = UclrError) -> None:
    """Fail early, before any work, when ``path`` cannot be written: create and remove its temporary sibling."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb"):
            pass
        tmp.unlink()
    except OSError as e:
        _remove(tmp)
        raise error(f"cannot write {what}: {os_reason(e)}", path) from None


def atomic_dir(
    path: str | Path,
    write: Callable[[Path], None],
    what: str = "folder",
    marker: str | None = None,
    error: type[UclrError] = UclrError,
) -> None:
    """Like :func:`atomic_write` for a folder: ``write(tmp_dir)``, fsync its files, rename it into place.

    An existing ``path`` is replaced only if it is a folder holding ``marker`` (an earlier output of the same
    kind); anything else is refused, so a mistyped ``--out`` never removes the user's files.
    """
    import shutil

    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink() or (marker is not None and not (path / marker).is_file()):
            raise error(f"output exists and is not an earlier {what}; refusing to replace it", path)
    tmp = temporary_sibling(path)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise error(f"cannot write {what}: {os_reason(e)}", path) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
