"""`uclr evaluate`: every model of a run folder on the fixed candidates, mean ± std over seeds."""

from __future__ import annotations

from pathlib import Path

import typer

from uclr_cli import report
from uclr_cli.cli import common, training
from uclr_cli.data.dataset import load_prepared
from uclr_cli.data.split import DEFAULT_BUCKETS
from uclr_cli.stages import evaluate as stage


def evaluate(
    run: Path | None = typer.Option(
        None, "--run", help="Run folder with seed-* folders (default: runs/<dataset name>)."
    ),
    data: Path | None = typer.Option(
        None, "--data", help="Prepared folder (default: the only one under data/, or uclr.toml's)."
    ),
    split: str = typer.Option("test", "--split", help="test | valid (select models on valid; read test once)."),
    k: str = typer.Option("10,20", "--k", help="Comma-separated cut-offs K."),
    by_activity: bool = typer.Option(
        False, "--by-activity", help="Add a table per activity bucket (users by train interactions)."
    ),
    buckets: str = typer.Option(
        ",".join(str(b) for b in DEFAULT_BUCKETS),
        "--buckets",
        help="Lower edges of the activity buckets, starting at 0.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout (and nothing else there)."),
    out: Path | None = typer.Option(None, "--out", help="Write per-seed, per-bucket rows to this parquet file."),
    plot: Path | None = typer.Option(
        None, "--plot", help="Save a PNG of NDCG@(first K) by activity bucket (needs matplotlib)."
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
) -> None:
    """Score Random, Pop and every trained variant on the same candidates; mean ± std over seeds."""
    ks = common.csv_list(k, "--k", int)
    edges = common.csv_list(buckets, "--buckets", int)
    if plot is not None:
        report.require_matplotlib("--plot")  # fail before the work, not after
    ds = load_prepared(Path(data) if data is not None else training.default_data_dir())
    run_dir = Path(run) if run is not None else Path("runs") / ds.name
    progress = common.info if common.STATE.verbose else None
    result = stage.run(ds, run_dir, split=split, ks=ks, buckets=edges, device=device, progress=progress)
    for w in result.warnings:
        common.warn(w)
    if out is not None:
        stage.write_per_seed(result.per_seed, out)
        common.info(f"wrote {out}")
    if plot is not None:
        report.eval_plot(result.report, plot, result.models)
        common.info(f"wrote {plot}")
    if as_json:
        print(report.eval_json(result.report))
        return
    if not common.STATE.quiet:
        console = common.out()
        for table in report.eval_tables(result.report, by_activity=by_activity, models=result.models):
            console.print(table)
