"""`uclr consolidate`: the DCP states an unfinished data-parallel run left, as the usual safetensors files."""

from __future__ import annotations

from pathlib import Path

import typer

from uclr_cli import dcp, layout
from uclr_cli.cli import common, training
from uclr_cli.lock import RunLock


def consolidate(
    run: Path | None = typer.Option(None, "--run", help="Run folder (default: runs/<dataset name>)."),
    data: Path | None = typer.Option(
        None, "--data", help="Prepared folder, only to find the default --run (default: the only one under data/)."
    ),
) -> None:
    """Write each seed's DCP state (seed-*/pretrain.dcp, left by an unfinished torchrun pretrain) as the
    safetensors checkpoint and resume state one process writes, then remove it."""
    run_dir = Path(run) if run is not None else Path("runs") / training.load_data(data, None).name
    layout.find_seeds(run_dir)  # a missing or empty run folder: one line, before the lock creates it
    record = training.recorded_dataset(run_dir)
    common.hold(RunLock(run_dir, "uclr consolidate"))
    for folder, head in dcp.consolidate_run(run_dir, record["fingerprint"] if record else None):
        meta, best = head["state_meta"], head["best_meta"]
        files = ([folder.name.removesuffix(".dcp") + ".safetensors"] if best else []) + [
            folder.name.removesuffix(".dcp") + ".resume.safetensors"
        ]
        common.info(
            f"{folder.parent.name}: wrote {' and '.join(files)} from {folder.name} (epoch {meta.get('epoch')}, "
            f"saved by {head['world_size']} ranks; best epoch {best['epoch'] if best else '-'}), removed {folder.name}"
        )
