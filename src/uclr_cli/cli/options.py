"""Command-line options read from the stage's pydantic model: each option is declared once, in config.py.

A command decorated with ``@options.from_model(Model)`` gets one option per
field of ``Model``: ``--field-name``, the field's description as help and its
default shown from the model (so help and config cannot drift). Every value
arrives as None unless given, so the command can tell a flag from a default
(flags > config file > model default). Lists are typed comma-separated
(``--hidden 128,32``); bools are ``--x/--no-x`` switches or the pair named
by the field's ``json_schema_extra={"flag": ...}``.

The decorated function takes ``flags`` (a dict of field name to given value or
None) and its own parameters (arguments, ``--resume``, ``--config``...),
declared as usual with typer.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from pydantic.fields import FieldInfo
from rich.markup import escape

from uclr_cli import config as cfgmod

#: Options of the training commands that are not model fields.
Seed = Annotated[int | None, typer.Option("--seed", help="A single seed (instead of --seeds).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the last saved state of each seed (and domain).")]
Config = Annotated[
    Path | None, typer.Option("--config", help="TOML file with any of these options as keys; flags win.")
]


def default_text(field: FieldInfo) -> str | None:
    """A field's default as a person would type it: ``128,32``, ``1e-5``, ``freeze-ae``; None when there is none."""
    value = field.get_default(call_default_factory=True)
    if value is None:
        return None
    if isinstance(value, bool):
        flag = _flag(field)
        if flag is None:
            return None if value is False else "on"  # a plain switch is off unless given
        on, off = str(flag).split("/")
        return (on if value else off).lstrip("-")
    if isinstance(value, list | tuple):
        return ",".join(_number(v) for v in value)
    return _number(value)


def _flag(field: FieldInfo) -> str | None:
    """The ``--on/--off`` pair a bool field names in ``json_schema_extra``, if any."""
    extra = field.json_schema_extra
    return extra.get("flag") if isinstance(extra, dict) else None


def _number(v: Any) -> str:
    if isinstance(v, float):
        return re.sub(r"e([+-])0*(\d)", lambda m: f"e{m.group(1).replace('+', '')}{m.group(2)}", f"{v:g}")
    return str(v)


def option_type(model: type[cfgmod.StageConfig], key: str, defaults: dict[str, Any] | None = None) -> Any:
    """The Annotated type of the option for ``model``'s field ``key``; ``defaults`` overrides the default shown."""
    field = shown_field(model, key, defaults)
    tp = cfgmod.field_type(model, key)
    flag = _flag(field)
    decls = [flag or f"--{key.replace('_', '-')}"]
    extra: dict[str, Any] = {}
    if get_origin(tp) is list:
        base = str
        extra["metavar"] = f"<{get_args(tp)[0].__name__},...>"
    elif get_origin(tp) is Literal:
        base = str  # checked by the model: one `error:` line naming the option
    elif tp is bool:
        base = bool
    elif tp in (int, float, str, Path):
        base = tp
    else:
        raise TypeError(f"{model.__name__}.{key}: no command-line form for {tp}")
    # The default is part of the help text: the option's own default stays None ("not given").
    shown = default_text(field)
    help_ = escape(field.description or "") + (f" \\[default: {escape(shown)}]" if shown is not None else "")
    opt = typer.Option(*decls, help=help_, show_default=False, **extra)
    return Annotated[base | None, opt]


def shown_field(model: type[cfgmod.StageConfig], key: str, defaults: dict[str, Any] | None = None) -> FieldInfo:
    """``model``'s field ``key``, with its default replaced by ``defaults[key]`` where given."""
    field = model.model_fields[key]
    if defaults and key in defaults:
        field = FieldInfo.merge_field_infos(field, default=defaults[key])
    return field


def from_model(
    model: type[cfgmod.StageConfig], *, exclude: Iterable[str] = (), defaults: dict[str, Any] | None = None
) -> Callable:
    """Decorate a command: every field of ``model`` not in ``exclude`` becomes an option (see the module doc).

    ``defaults``: the defaults this command's model applies instead of the fields' own (help shows them), e.g.
    a baseline's per-model values (config.BASELINE_DEFAULTS)."""
    skip = set(exclude)

    def decorate(fn: Callable) -> Callable:
        own = inspect.signature(fn, eval_str=True).parameters
        if "flags" not in own:
            raise TypeError(f"{fn.__name__} must take a `flags` parameter")
        args = [p for n, p in own.items() if n != "flags" and _is_argument(p)]
        rest = [p for n, p in own.items() if n != "flags" and not _is_argument(p)]
        fields = [f for f in model.model_fields if f not in skip and f not in own]
        generated = []
        for f in fields:
            generated.append(
                inspect.Parameter(
                    f, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=option_type(model, f, defaults)
                )
            )
            if f == "seeds" and "seed" in own:  # --seed right after --seeds
                generated.append(own["seed"].replace(kind=inspect.Parameter.KEYWORD_ONLY))
        rest = [p for p in rest if not (p.name == "seed" and "seeds" in fields)]
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in args + generated + rest]

        def command(**kw: Any) -> Any:
            flags = {f: kw.pop(f) for f in fields}
            return fn(flags, **kw)

        command.__name__ = fn.__name__
        command.__qualname__ = fn.__qualname__
        command.__doc__ = fn.__doc__
        command.__module__ = fn.__module__
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.config_model = model  # type: ignore[attr-defined]  # read by the help test
        command.config_defaults = dict(defaults or {})  # type: ignore[attr-defined]
        return command

    return decorate


def _is_argument(p: inspect.Parameter) -> bool:
    return get_origin(p.annotation) is Annotated and any(
        isinstance(m, typer.models.ArgumentInfo) for m in get_args(p.annotation)[1:]
    )


def given(model: type[cfgmod.StageConfig], flags: dict[str, Any]) -> dict[str, Any]:
    """The flags given on the command line (not None), lists read from their comma-separated text."""
    out: dict[str, Any] = {}
    for key, value in flags.items():
        if value is None:
            continue
        if isinstance(value, str) and get_origin(cfgmod.field_type(model, key)) is list:
            try:
                value = cfgmod.value_from_text(model, key, value)
            except ValueError as e:
                raise cfgmod.ConfigError(str(e), f"--{key.replace('_', '-')}") from None
        out[key] = value
    return out
