"""What every command shares: global flags, consoles, error rendering, option parsing."""

from __future__ import annotations

import atexit
import contextlib
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from uclr_cli import distributed
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


def _set_flag(name: str):
    def callback(ctx, param, value: bool) -> None:
        if value:
            setattr(STATE, name, True)

    return callback


class UclrGroup(TyperGroup):
    """Renders UclrError as one line and exit 1; Ctrl-C as exit 130; gives every command -q and -v."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for cmd in self.commands.values():
            self._add_global_flags(cmd)

    def add_command(self, cmd, name: str | None = None) -> None:
        super().add_command(cmd, name)
        self._add_global_flags(cmd)

    def _add_global_flags(self, cmd) -> None:
        """-q/--quiet and -v/--verbose after the subcommand as well (`uclr pretrain --quiet`): the root's own."""
        if hasattr(cmd, "commands"):  # a group of subcommands
            for sub in cmd.commands.values():
                self._add_global_flags(sub)
            return
        have = {opt for p in cmd.params for opt in getattr(p, "opts", [])}
        for p in self.params:
            if p.name in ("quiet", "verbose") and not set(p.opts) & have:
                flag = copy.copy(p)
                flag.expose_value = False  # not passed to the command function
                flag.is_eager = p.name == "verbose"  # before other options' checks, which then show tracebacks
                flag.callback = _set_flag(p.name)
                cmd.params.append(flag)

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
            rank = distributed.env_rank()
            if rank == 0:
                print(f"error: {line}", file=sys.stderr)
            elif distributed.JOINED:  # under torchrun: a check before joining failed alike on rank 0, which said it
                who = "" if line.startswith(f"rank {rank}") else f"rank {rank}: "  # said once
                print(f"error: {who}{line}", file=sys.stderr)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None


def check_output_file(path, option: str) -> None:
    """An output file named by ``option`` can be written there (checked before any work)."""
    if path is None:
        return
    if Path(path).is_dir():
        raise ConfigError("is a folder, not a file name", f"{option} {path}")
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"{parent} is a file, not a folder", f"{option} {path}")
