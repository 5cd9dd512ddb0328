"""`uclr prepare SOURCE [RAW]`: raw logs or synthetic data -> a prepared folder."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from uclr_cli import config as cfgmod
from uclr_cli import report
from uclr_cli.cli import common
from uclr_cli.stages import prepare as stage


def prepare(
    source: str = typer.Argument(..., help="amazon | douban | files | synthetic"),
    raw: Path | None = typer.Argument(None, help="Folder with the raw files (not for synthetic)."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default: data/<source>)."),
    domains: str | None = typer.Option(None, "--domains", help="Comma-separated domains to keep (default: all)."),
    min_rating: float | None = typer.Option(
        None, "--min-rating", help="Keep ratings >= R (default: every rating counts)."
    ),
    drop_items: float = typer.Option(
        0.0, "--drop-items", help="Share of each domain's items removed at random (paper's Amazon: 0.7)."
    ),
    negatives: int = typer.Option(99, "--negatives", help="Negative candidates per valid/test row."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split candidates (and the generator)."),
    amazon_layout: str = typer.Option(
        "auto", "--amazon-layout", help="Amazon CSV column order: auto | user-item | item-user."
    ),
    user_col: str = typer.Option("user", "--user-col", help="files: user column name."),
    item_col: str = typer.Option("item", "--item-col", help="files: item column name."),
    rating_col: str = typer.Option("rating", "--rating-col", help="files: rating column name."),
    time_col: str = typer.Option("timestamp", "--time-col", help="files: timestamp column name."),
    preset: str = typer.Option(
        "default", "--preset", help="synthetic: default | tiny | amazon (the paper's Amazon shape)."
    ),
    users: int | None = typer.Option(None, "--users", help="synthetic: number of users."),
    items: str | None = typer.Option(None, "--items", help="synthetic: items per domain, comma-separated."),
    interactions: str | None = typer.Option(
        None, "--interactions", help="synthetic: interactions per domain, comma-separated."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON on stdout."),
) -> None:
    """Turn raw logs into reproducible leave-one-out splits with fixed candidates."""
    values = dict(
        source=source,
        raw=raw,
        out=out,
        domains=common.csv_list(domains, "--domains"),
        min_rating=min_rating,
        drop_items=drop_items,
        negatives=negatives,
        seed=seed,
        amazon_layout=amazon_layout,
        user_col=user_col,
        item_col=item_col,
        rating_col=rating_col,
        time_col=time_col,
        preset=preset,
        users=users,
        items=common.csv_list(items, "--items", int),
        interactions=common.csv_list(interactions, "--interactions", int),
    )
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
