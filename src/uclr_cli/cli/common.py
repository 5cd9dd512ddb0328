"""What every command shares: global flags, consoles, error rendering, option parsing."""

from __future__ import annotations

import atexit
import contextlib
import sys
from dataclasses import dataclass
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from uclr_cli.errors import ConfigError, UclrError


@dataclass
class State:
    quiet: bool = False
    verbose: bool = False


STATE = State()


def out() -> Console:
    """Console for results (stdout); tables are not squeezed to 80 columns when piped to a file."""
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def err() -> Console:
    """Console for errors, warnings and progress (stderr)."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def info(msg: str) -> None:
    if not STATE.quiet:
        err().print(msg)


def warn(msg: str) -> None:
    if not STATE.quiet:
        err().print(f"[yellow]warning:[/] {msg}")


#: Resources held until the running command ends (e.g. the run-folder lock); see :func:`hold`.
_SCOPES: list[contextlib.ExitStack] = []


def hold(resource):
    """Enter the context manager ``resource`` until the running command ends.

    It is exited when the command returns, fails or is interrupted, before the
    error line is printed. Outside a command (library use) it is held until exit.
    """
    if _SCOPES:
        return _SCOPES[-1].enter_context(resource)
    value = resource.__enter__()
    atexit.register(resource.__exit__, None, None, None)
    return value


class UclrGroup(TyperGroup):
    """Renders UclrError as one line and exit 1; Ctrl-C as exit 130."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            with contextlib.ExitStack() as scope:
                _SCOPES.append(scope)
                try:
                    return super().invoke(ctx)
                finally:
                    _SCOPES.pop()
        except UclrError as e:
            if STATE.verbose:
                raise
            line = e.one_line().replace("\r", "\\r").replace("\n", "\\n")  # a path may hold a newline
            print(f"error: {line}", file=sys.stderr)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None


def csv_list(value: str | None, option: str, cast=str) -> list | None:
    """Parse 'a,b,c' into a list; a bad element names the option."""
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts:
        raise ConfigError("empty list", option)
    try:
        return [cast(p) for p in parts]
    except ValueError:
        raise ConfigError(f"cannot read {value!r} as a list of {cast.__name__}", option) from None


def drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}
