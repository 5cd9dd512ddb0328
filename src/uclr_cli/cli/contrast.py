"""`uclr contrast`: the dual-stream autoencoder with the user-aware contrastive loss."""

from __future__ import annotations

import math

from rich.table import Table

from uclr_cli.cli import options, training
from uclr_cli.config import ContrastConfig
from uclr_cli.stages import contrast as stage


@options.from_model(ContrastConfig)
def contrast(flags, seed: options.Seed = None, resume: options.Resume = False, config: options.Config = None) -> None:
    """Train the contrastive dual-stream autoencoder on the pretrained user table."""
    cfg, ds, run_dir = training.resolve(ContrastConfig, flags, config, seed)
    world = training.join(cfg, cfg.batch_size, resume)  # under torchrun: data-parallel (docs/distributed.md)
    training.write_config(run_dir, f"{stage.STAGE}-{cfg.temperature}", cfg, ds)
    results = training.run_seeds(
        stage.STAGE,
        cfg.seeds,
        lambda s, rep: stage.run_seed(cfg, ds, run_dir, s, resume=resume, progress=rep, world=world),
    )
    training.print_summary(
        f"{stage.STAGE} ({cfg.temperature})",
        results,
        ds.domains,
        [tau_table(results)] if cfg.temperature != "none" and world.main else [],
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
