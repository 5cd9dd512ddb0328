"""`uclr stats`: statistics of a prepared folder, and interactions-per-user histograms."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from uclr_cli import report
from uclr_cli.cli import common, training
from uclr_cli.data import stats as stage
from uclr_cli.data.dataset import load_prepared


def stats(
    data: Path | None = typer.Option(
        None, "--data", help="Prepared folder (default: the only one under data/, or uclr.toml's)."
    ),
    plot: Path | None = typer.Option(
        None, "--plot", help="Save per-domain log-log histograms of interactions per user (PNG; needs matplotlib)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the statistics as JSON on stdout (and nothing else there)."
    ),
) -> None:
    """Show the prepared data's statistics (users, items, splits, activity buckets)."""
    if plot is not None:
        report.require_matplotlib("--plot")
    ds = load_prepared(Path(data) if data is not None else training.default_data_dir())
    result = stage.stats(ds)
    hist = {d: result.histogram(d) for d in ds.domains}
    if plot is not None:
        report.stats_plot(ds.name, hist, plot)
        common.info(f"wrote {plot}")
    if as_json:
        print(json.dumps(report.stats_json(result.manifest, hist), indent=2))
        return
    if not common.STATE.quiet:
        console = common.out()
        for table in report.prepare_table(result.manifest):
            console.print(table)
