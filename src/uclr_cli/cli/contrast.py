"""`uclr contrast`: the dual-stream autoencoder with the user-aware contrastive loss."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from uclr_cli.cli import common, training
from uclr_cli.config import ContrastConfig
from uclr_cli.stages import contrast as stage


def contrast(
    data: Path | None = typer.Option(None, "--data", help="Prepared folder (default: the only one under data/)."),
    run: Path | None = typer.Option(None, "--run", help="Run folder (default: runs/<dataset name>)."),
    seeds: str | None = typer.Option(None, "--seeds", help="Comma-separated seeds (default 0)."),
    seed: int | None = typer.Option(None, "--seed", help="A single seed."),
    temperature: str | None = typer.Option(
        None, "--temperature", help="individual (UCL-AE) | global (CL-AE) | none (AE)."
    ),
    mask: str | None = typer.Option(
        None, "--mask", help="element (share of each row's entries) | row (whole rows, the paper's wording)."
    ),
    mask_ratio: float | None = typer.Option(None, "--mask-ratio", help="Share masked in stream 2 (default 0.3)."),
    alpha: float | None = typer.Option(None, "--alpha", help="Weight of the reconstruction loss (default 1e-3)."),
    tau_min: float | None = typer.Option(None, "--tau-min", help="Lower bound of τ (default 1e-5)."),
    tau_max: float | None = typer.Option(None, "--tau-max", help="Upper bound of τ (default 1)."),
    tau_init: float | None = typer.Option(None, "--tau-init", help="Initial τ (default 0.1)."),
    tau_lr: float | None = typer.Option(None, "--tau-lr", help="Step size of the τ update (default 0.01)."),
    rho: float | None = typer.Option(
        None, "--rho", help="ρ of the ρ·τ term that keeps τ off its upper bound (default 0.3)."
    ),
    gamma: float | None = typer.Option(
        None, "--gamma", help="Weight of the new estimate in the moving average u (default 0.9)."
    ),
    hidden: str | None = typer.Option(None, "--hidden", help="Encoder sizes, e.g. 128,32 (decoder mirrors)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Maximum epochs (default 100)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Users per step (default 2048)."),
    lr: float | None = typer.Option(None, "--lr", help="Adam learning rate of the autoencoder (default 1e-3)."),
    patience: int | None = typer.Option(
        None, "--patience", help="Evaluations without improvement before stopping (default 10)."
    ),
    eval_every: int | None = typer.Option(None, "--eval-every", help="Validate every N epochs (default 1)."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last epoch checkpoint of each seed."),
    config: Path | None = typer.Option(None, "--config", help="TOML file with any of these options; flags win."),
) -> None:
    """Train the contrastive dual-stream autoencoder on the pretrained user table."""
    cli = dict(
        data=data,
        run=run,
        seeds=training.seeds_option(seeds, seed),
        temperature=temperature,
        mask=mask,
        mask_ratio=mask_ratio,
        alpha=alpha,
        tau_min=tau_min,
        tau_max=tau_max,
        tau_init=tau_init,
        tau_lr=tau_lr,
        rho=rho,
        gamma=gamma,
        hidden=common.csv_list(hidden, "--hidden", int),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        patience=patience,
        eval_every=eval_every,
        device=device,
    )
    cfg, ds, run_dir = training.resolve(ContrastConfig, cli, config)
    training.write_config(run_dir, f"{stage.STAGE}-{cfg.temperature}", cfg, ds)
    results = training.run_seeds(
        stage.STAGE, cfg.seeds, lambda s, rep: stage.run_seed(cfg, ds, run_dir, s, resume=resume, progress=rep)
    )
    training.print_summary(
        f"{stage.STAGE} ({cfg.temperature})",
        results,
        ds.domains,
        [tau_table(results)] if cfg.temperature != "none" else [],
    )


def tau_table(results) -> Table:
    """Mean τ by user activity: do less active users get smaller temperatures?"""
    labels = list(results[0].extra["tau_by_bucket"])
    t = Table(title="mean τ by train interactions per user (all domains)")
    t.add_column("seed", justify="right")
    for lab in labels:
        t.add_column(lab, justify="right")
    t.add_column("min / max", justify="right")
    t.add_column("at a bound", justify="right")
    for r in results:
        b = r.extra["tau_by_bucket"]
        lo, hi = r.extra["tau_min_max"]
        t.add_row(
            str(r.seed),
            *("-" if math.isnan(b[lab]) else f"{b[lab]:.4g}" for lab in labels),
            f"{lo:.3g} / {hi:.3g}",
            f"{100 * r.extra['tau_at_bounds']:.1f}%",
        )
    return t
