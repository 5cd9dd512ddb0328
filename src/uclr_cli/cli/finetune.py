"""`uclr finetune`: domain-aware LoRA finetuning, one adapter per domain and seed."""

from __future__ import annotations

from pathlib import Path

import typer

from uclr_cli.cli import training
from uclr_cli.config import FinetuneConfig
from uclr_cli.stages import finetune as stage


def finetune(
    domain: str | None = typer.Option(None, "--domain", help="A domain name, or all (default all)."),
    rank: int | None = typer.Option(None, "--rank", help="LoRA rank r (default 8)."),
    lora_alpha: float | None = typer.Option(
        None, "--lora-alpha", help="LoRA scale numerator: W = W0 + (alpha/r)·B·A (default r)."
    ),
    train_ae: bool | None = typer.Option(
        None,
        "--train-ae/--freeze-ae",
        help="Also finetune the autoencoder (default off: validation preferred the adapter alone).",
    ),
    train_tau: bool | None = typer.Option(
        None, "--train-tau/--freeze-tau", help="Keep updating the temperatures (default off)."
    ),
    train_items: bool | None = typer.Option(
        None, "--train-items/--freeze-items", help="Also finetune the domain's item embeddings (default off)."
    ),
    contrast_weight: float | None = typer.Option(
        None, "--contrast-weight", help="Weight of the combined contrastive loss (default 1)."
    ),
    reg: float | None = typer.Option(None, "--reg", help="L2 weight on the rows of a batch (default 1e-5)."),
    data: Path | None = typer.Option(None, "--data", help="Prepared folder (default: the only one under data/)."),
    run: Path | None = typer.Option(None, "--run", help="Run folder (default: runs/<dataset name>)."),
    seeds: str | None = typer.Option(None, "--seeds", help="Comma-separated seeds (default 0)."),
    seed: int | None = typer.Option(None, "--seed", help="A single seed."),
    epochs: int | None = typer.Option(None, "--epochs", help="Maximum epochs (default 50)."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Positives (and contrast users) per step (default 2048)."
    ),
    lr: float | None = typer.Option(None, "--lr", help="Adam learning rate (default 1e-3)."),
    patience: int | None = typer.Option(
        None, "--patience", help="Evaluations without improvement before stopping (default 10)."
    ),
    eval_every: int | None = typer.Option(None, "--eval-every", help="Validate every N epochs (default 1)."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last epoch checkpoint."),
    config: Path | None = typer.Option(None, "--config", help="TOML file with any of these options; flags win."),
) -> None:
    """Finetune the whole framework per domain with LoRA on the user table."""
    cli = dict(
        domain=domain,
        rank=rank,
        lora_alpha=lora_alpha,
        train_ae=train_ae,
        train_tau=train_tau,
        train_items=train_items,
        contrast_weight=contrast_weight,
        reg=reg,
        data=data,
        run=run,
        seeds=training.seeds_option(seeds, seed),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        patience=patience,
        eval_every=eval_every,
        device=device,
    )
    cfg, ds, run_dir = training.resolve(FinetuneConfig, cli, config)
    domains = ds.domains if cfg.domain == "all" else [ds.domains[ds.domain_index(cfg.domain)]]
    training.write_config(run_dir, stage.STAGE, cfg, ds)
    results = training.run_seeds(
        stage.STAGE,
        cfg.seeds,
        lambda s, rep: [stage.run_domain(cfg, ds, run_dir, s, d, resume=resume, progress=rep) for d in domains],
    )
    training.print_summary(stage.STAGE, training.merge_domains(results), ds.domains)
