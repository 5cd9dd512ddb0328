"""`uclr prepare SOURCE [RAW]`: raw logs or synthetic data -> a prepared folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from uclr_cli import config as cfgmod
from uclr_cli import report
from uclr_cli.cli import common, options
from uclr_cli.stages import prepare as stage


@options.from_model(cfgmod.PrepareConfig)
def prepare(
    flags,
    source: Annotated[str, typer.Argument(help="amazon | douban | files | synthetic")],
    raw: Annotated[Path | None, typer.Argument(help="Folder with the raw files (not for synthetic).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON on stdout.")] = False,
) -> None:
    """Turn raw logs into reproducible leave-one-out splits with fixed candidates."""
    values = {"source": source, "raw": raw, **options.given(cfgmod.PrepareConfig, flags)}
    cfg = cfgmod.build(cfgmod.PrepareConfig, values)
    result = stage.run(cfg, on_warning=common.warn)
    if as_json:
        print(json.dumps(report.prepare_json(result.manifest), indent=2))
        return
    if not common.STATE.quiet:
        console = common.out()
        for table in report.prepare_table(result.manifest):
            console.print(table)
        console.print(f"wrote {result.out}")
