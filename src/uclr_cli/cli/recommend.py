"""`uclr recommend`: top-K items of a domain for one user (`--user`) or a file of users (`--users`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from uclr_cli.cli import common, training
from uclr_cli.data import ids
from uclr_cli.errors import ConfigError, DataError
from uclr_cli.files import check_writable
from uclr_cli.stages import recommend as stage


def _model_line(result: stage.RecommendResult) -> str:
    c = result.choice
    if not c.picked:
        return f"{c.name} (seed {c.seed})"
    best = f"NDCG@10 {c.valid[c.name]:.2f} % over its seeds"
    return f"{c.name} (seed {c.seed}; best on validation in {result.domain}: {best})"


def recommend(
    run: Path | None = typer.Option(None, "--run", help="Run folder (default: runs/<dataset name>)."),
    data: Path | None = typer.Option(
        None, "--data", help="Prepared folder (default: the one the run records, else the only one under data/)."
    ),
    domain: str = typer.Option(..., "--domain", help="Domain whose items are recommended."),
    user: str | None = typer.Option(None, "--user", help="One raw user id (as in the raw logs)."),
    users: Path | None = typer.Option(
        None, "--users", help="File of raw user ids: one a line, or a parquet/CSV column (see --column)."
    ),
    column: str | None = typer.Option(
        None, "--column", help="Id column of a parquet/CSV --users file (default: user_id, user, or the only one)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Batch output, .parquet or .csv: user, rank, item, score."),
    unknown_out: Path | None = typer.Option(
        None, "--unknown-out", help="Where unknown ids of --users go (default: <out>.unknown.txt)."
    ),
    top: int = typer.Option(10, "--top", help="Items per user."),
    model: str | None = typer.Option(
        None, "--model", help="Any trained variant or baseline (default: the best on validation in the domain)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the model (default: the first that has it)."),
    include_seen: bool = typer.Option(False, "--include-seen", help="Keep the user's train items of the domain."),
    as_json: bool = typer.Option(False, "--json", help="--user: print JSON on stdout."),
    as_csv: bool = typer.Option(False, "--csv", help="--user: print CSV on stdout."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
) -> None:
    """Rank every item of a domain for users given by raw id; seen train items left out (by default)."""
    if (user is None) == (users is None):
        raise ConfigError("give exactly one of --user RAW_ID or --users FILE", "--user/--users")
    if as_json and as_csv:
        raise ConfigError("choose one of --json and --csv", "--json/--csv")
    if users is not None:
        if out is None:
            raise ConfigError("--users writes a file: give --out FILE.parquet or FILE.csv", "--out")
        if as_json or as_csv:
            raise ConfigError("--json/--csv print one user's list; with --users the format is --out's suffix", "--json")
        stage.output_format(out)
        unknown_out = unknown_out or out.with_name(out.name + ".unknown.txt")
        check_writable(out, "output", DataError)
        wanted = ids.read_id_file(users, column)
        if not wanted:
            raise DataError("users file holds no id", users)
    else:
        if out is not None:
            raise ConfigError("--out goes with --users; --user prints its list", "--out")
        wanted = [user]
    ds = training.load_data(data, run)
    run_dir = Path(run) if run is not None else Path("runs") / ds.name
    result = stage.run(
        ds, run_dir, domain, wanted, k=top, model=model, seed=seed, include_seen=include_seen, device=device
    )
    if users is None:
        if result.unknown:
            raise DataError(f"unknown user id {result.unknown[0]!r} (not in the prepared data)", "--user")
        _print_one(result, user, as_json, as_csv)
        return
    if result.n_users == 0:
        stage.write_unknown(result.unknown, unknown_out)
        raise DataError(
            f"none of the {len(result.unknown):,} ids is in the prepared data (listed in {unknown_out})", users
        )
    stage.write(result.frame, out)
    if result.unknown:
        stage.write_unknown(result.unknown, unknown_out)
        common.warn(
            f"{len(result.unknown):,} of {len(result.unknown) + result.n_users:,} distinct ids are not in "
            f"the data: no list for them; they are in {unknown_out}"
        )
    common.info(
        f"wrote {out}: top-{result.k} {result.domain} items for {result.n_users:,} users by {_model_line(result)} "
        f"in {result.seconds:.1f} s"
    )


def _print_one(result: stage.RecommendResult, user: str, as_json: bool, as_csv: bool) -> None:
    f = result.frame
    if as_json:
        c = result.choice
        payload = {
            "user": user,
            "domain": result.domain,
            "model": c.name,
            "seed": c.seed,
            "selected": "best mean valid NDCG@10" if c.picked else "asked for (--model)",
            "valid_ndcg10": c.valid or None,
            "items": [{"rank": r, "item": i, "score": s} for _, r, i, s in f.iter_rows()],
        }
        print(json.dumps(payload, indent=2))
        return
    if as_csv:
        f.write_csv(sys.stdout)
        return
    common.info(f"model: {_model_line(result)}")
    t = Table(title=f"top {result.k} {result.domain} items for user {user}")
    for col in ("rank", "item", "score"):
        t.add_column(col, justify="right" if col != "item" else "left")
    for _, r, i, s in f.iter_rows():
        t.add_row(str(r), i, f"{s:.4f}")
    common.out().print(t)
