"""User-facing errors: one line, naming the file, row or option at fault."""

from __future__ import annotations

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
