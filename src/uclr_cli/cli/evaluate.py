"""`uclr evaluate`: every model of a run folder on the fixed candidates, mean ± std over seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from uclr_cli import config as cfgmod
from uclr_cli import report
from uclr_cli.cli import common, options, training
from uclr_cli.config import EvaluateConfig
from uclr_cli.stages import evaluate as stage


@options.from_model(EvaluateConfig)
def evaluate(
    flags,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the results as JSON on stdout (and nothing else there).")
    ] = False,
) -> None:
    """Score Random, Pop and every trained variant on the same candidates; mean ± std over seeds."""
    cfg = cfgmod.build(EvaluateConfig, options.given(EvaluateConfig, flags))
    for path, option in ((cfg.out, "--out"), (cfg.plot, "--plot")):
        common.check_output_file(path, option)
    if cfg.plot is not None:
        report.require_matplotlib("--plot")  # fail before the work, not after
    ds = training.load_data(cfg.data, cfg.run)
    run_dir = Path(cfg.run) if cfg.run is not None else Path("runs") / ds.name
    progress = common.info if common.STATE.verbose else None
    result = stage.run(
        ds,
        run_dir,
        split=cfg.split,
        ks=cfg.k,
        buckets=cfg.buckets,
        device=cfg.device,
        progress=progress,
        protocols=cfg.protocol,
    )
    for w in result.warnings:
        common.warn(w)
    if cfg.out is not None:
        stage.write_per_seed(result.per_seed, cfg.out)
        common.info(f"wrote {cfg.out}")
    if cfg.plot is not None:
        report.eval_plot(result.report, cfg.plot, result.models)
        common.info(f"wrote {cfg.plot}")
    if as_json:
        print(report.eval_json(result.report))
        return
    if not common.STATE.quiet:
        console = common.out()
        for table in report.eval_tables(result.report, by_activity=cfg.by_activity, models=result.models):
            console.print(table)
