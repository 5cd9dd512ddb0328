"""`uclr export`: user and item vectors of a trained model, with raw ids and the scoring convention."""

from __future__ import annotations

from pathlib import Path

import typer

from uclr_cli.cli import common, training
from uclr_cli.errors import ConfigError, DataError
from uclr_cli.files import check_writable
from uclr_cli.stages import export as stage


def export(
    run: Path | None = typer.Option(None, "--run", help="Run folder (default: runs/<dataset name>)."),
    data: Path | None = typer.Option(
        None, "--data", help="Prepared folder (default: the one the run records, else the only one under data/)."
    ),
    domain: str | None = typer.Option(None, "--domain", help="One domain (default: every domain)."),
    model: str | None = typer.Option(
        None, "--model", help="A trained dot-product model (default: the best on validation; NeuMF cannot be)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the model (default: the first that has it)."),
    fmt: str = typer.Option(..., "--format", help="parquet | safetensors (one file) | npy (a folder)."),
    out: Path = typer.Option(..., "--out", help="Output file (a folder for npy)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
) -> None:
    """Write user and item representations whose dot products are the model's scores."""
    if fmt not in stage.FORMATS:
        raise ConfigError(f"format must be one of {', '.join(stage.FORMATS)}; got {fmt!r}", "--format")
    if fmt != "npy":
        check_writable(out, "export", DataError)
    ds = training.load_data(data, run)
    run_dir = Path(run) if run is not None else Path("runs") / ds.name
    domains = None if domain is None else [domain]
    result = stage.run(ds, run_dir, out, fmt, domains=domains, model=model, seed=seed, device=device)
    c = result.choice
    how = "best on validation" if c.picked else "asked for"
    common.info(
        f"wrote {out}: {c.name} (seed {c.seed}, {how}) users and items of {', '.join(result.domains)}, "
        f"m = {result.dim}, score = dot product"
    )
