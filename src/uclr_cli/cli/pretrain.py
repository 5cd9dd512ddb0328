"""`uclr pretrain`: PGE, BPR-MF over all domains, one checkpoint per seed."""

from __future__ import annotations

from pathlib import Path

import typer

from uclr_cli.cli import training
from uclr_cli.config import PretrainConfig
from uclr_cli.stages import pretrain as stage


def pretrain(
    data: Path | None = typer.Option(
        None, "--data", help="Prepared folder (default: the only one under data/, or uclr.toml's)."
    ),
    run: Path | None = typer.Option(None, "--run", help="Run folder (default: runs/<dataset name>)."),
    seeds: str | None = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2,3,4 (default: 0)."),
    seed: int | None = typer.Option(None, "--seed", help="A single seed."),
    epochs: int | None = typer.Option(None, "--epochs", help="Maximum epochs (default 200)."),
    dim: int | None = typer.Option(None, "--dim", help="Embedding size m (default 128)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Positives per step (default 2048)."),
    lr: float | None = typer.Option(None, "--lr", help="Adam learning rate (default 1e-3)."),
    reg: float | None = typer.Option(None, "--reg", help="L2 weight λ on the rows of a batch (default 1e-5)."),
    optimizer: str | None = typer.Option(
        None,
        "--optimizer",
        help=(
            "rowwise-rmsprop (default: Adam with beta1=0 on the touched rows) | "
            "rowwise-adam (Adam on the touched rows) | adam (dense, the paper's)."
        ),
    ),
    patience: int | None = typer.Option(
        None, "--patience", help="Evaluations without improvement before stopping (default 10)."
    ),
    eval_every: int | None = typer.Option(None, "--eval-every", help="Validate every N epochs (default 1)."),
    save_every: float | None = typer.Option(
        None, "--save-every", help="Seconds between resume checkpoints; 0 = every epoch (default 30)."
    ),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda (default auto)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last epoch checkpoint of each seed."),
    config: Path | None = typer.Option(None, "--config", help="TOML file with any of these options; flags win."),
) -> None:
    """Pretrain global user and item embeddings (PGE) over all domains."""
    cli = dict(
        data=data,
        run=run,
        seeds=training.seeds_option(seeds, seed),
        epochs=epochs,
        dim=dim,
        batch_size=batch_size,
        lr=lr,
        reg=reg,
        optimizer=optimizer,
        patience=patience,
        eval_every=eval_every,
        save_every=save_every,
        device=device,
    )
    cfg, ds, run_dir = training.resolve(PretrainConfig, cli, config)
    training.write_config(run_dir, stage.STAGE, cfg, ds)
    results = training.run_seeds(
        stage.STAGE, cfg.seeds, lambda s, rep: stage.run_seed(cfg, ds, run_dir, s, resume=resume, progress=rep)
    )
    training.print_summary(stage.STAGE, results, ds.domains)
