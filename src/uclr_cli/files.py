"""Atomic file writes: a hidden temporary sibling, fsync, rename into place.

Every output file of uclr (checkpoints, JSON, parquet, PNG) goes through
:func:`atomic_write`, so a kill, Ctrl-C or full disk leaves the old file or
the new one, never half of one, and an OS error is one line naming the file.
"""

from __future__ import annotations

import os
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
    except OSError as e:  # disk full, read-only, permissions
        tmp.unlink(missing_ok=True)
        raise error(f"cannot write {what}: {os_reason(e)}", path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
