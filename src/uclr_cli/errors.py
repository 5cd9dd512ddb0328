"""User-facing errors: one line, naming the file, row or option at fault."""

from __future__ import annotations

import re
from pathlib import Path


class UclrError(Exception):
    """An error caused by input or state the user controls.

    The CLI prints it as ``error: <message> (<where>)`` and exits 1, without a
    traceback. ``where`` names the file (and line) or option concerned.
    """

    def __init__(self, message: str, where: str | Path | None = None, line: int | None = None):
        self.message = message.strip().splitlines()[0] if message.strip() else "unknown error"
        self.where = str(where) if where is not None else None
        self.line = line
        super().__init__(self.one_line())

    def one_line(self) -> str:
        loc = ""
        if self.where is not None:
            loc = self.where if self.line is None else f"{self.where}, line {self.line}"
        return f"{self.message} ({loc})" if loc else self.message


class DataError(UclrError):
    """Raw or prepared data that cannot be used."""


class ConfigError(UclrError):
    """An option or config key with a bad value."""


class CheckpointError(UclrError):
    """A checkpoint that is missing, corrupt, or does not match the run."""


class TrainingError(UclrError):
    """Training that cannot go on (e.g. a non-finite loss)."""


def os_reason(e: Exception) -> str:
    """The OS reason of a failed read or write, lower-case ("no space left on device").

    Also digs the reason out of polars' "io error: ... (os error N)" messages.
    """
    s = getattr(e, "strerror", None) or str(e) or type(e).__name__
    m = re.search(r"(?:io|i/o) error: (.+?)(?: \(os error \d+\))?$", s, re.IGNORECASE | re.MULTILINE)
    s = (m.group(1) if m else s.strip().splitlines()[0])[:120]
    return s[:1].lower() + s[1:]
