"""The `uclr` Typer app: global options and command registration."""

from __future__ import annotations

import typer

from uclr_cli import __version__
from uclr_cli.cli import (
    ablate,
    baseline,
    common,
    consolidate,
    contrast,
    evaluate,
    export,
    finetune,
    prepare,
    pretrain,
    recommend,
    stats,
)

app = typer.Typer(
    name="uclr",
    cls=common.UclrGroup,
    help="Robust multi-domain recommendation (UCLR): prepare data, train, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"uclr {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors (and requested results)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail; show tracebacks on errors."),
) -> None:
    """uclr: robust multi-domain recommendation with user-aware contrastive learning."""
    common.STATE.quiet = quiet
    common.STATE.verbose = verbose


app.command("prepare")(prepare.prepare)
app.command("pretrain")(pretrain.pretrain)
app.command("contrast")(contrast.contrast)
app.command("finetune")(finetune.finetune)
app.command("ablate")(ablate.ablate)
app.add_typer(baseline.app, name="baseline")
app.command("consolidate")(consolidate.consolidate)
app.command("evaluate")(evaluate.evaluate)
app.command("recommend")(recommend.recommend)
app.command("export")(export.export)
app.command("stats")(stats.stats)


def main() -> None:
    from uclr_cli.malloc import keep_freed_memory

    keep_freed_memory()  # per-step tensors reuse heap memory instead of page-faulting fresh mmaps
    app()
