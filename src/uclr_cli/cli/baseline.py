"""`uclr baseline NAME`: single-domain BPRMF, NeuMF or LightGCN per domain and seed (the paper's Table 2)."""

from __future__ import annotations

from pathlib import Path

import typer

from uclr_cli import registry
from uclr_cli.cli import common, training
from uclr_cli.config import BaselineConfig
from uclr_cli.errors import ConfigError
from uclr_cli.stages import baseline as stage


def baseline(
    name: str = typer.Argument(..., metavar="NAME", help="bprmf | neumf | lightgcn."),
    domain: str | None = typer.Option(None, "--domain", help="A domain name, or all (default all)."),
    data: Path | None = typer.Option(
        None, "--data", help="Prepared folder (default: the only one under data/, or uclr.toml's)."
    ),
    run: Path | None = typer.Option(None, "--run", help="Run folder (default: runs/<dataset name>)."),
    seeds: str | None = typer.Option(None, "--seeds", help="Comma-separated seeds (default 0)."),
    seed: int | None = typer.Option(None, "--seed", help="A single seed."),
    dim: int | None = typer.Option(None, "--dim", help="Embedding size m (default 128)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Maximum epochs (default 100)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Positives per step (default 2048)."),
    lr: float | None = typer.Option(None, "--lr", help="Adam learning rate (default 1e-3)."),
    reg: float | None = typer.Option(None, "--reg", help="L2 weight on the embedding rows of a batch (default 1e-5)."),
    init_std: float | None = typer.Option(
        None, "--init-std", help="Std of the normal initial embeddings (default 0.1)."
    ),
    negatives: int | None = typer.Option(
        None, "--negatives", help="neumf: sampled negatives per positive (default 4)."
    ),
    mlp_layers: str | None = typer.Option(
        None, "--mlp-layers", help="neumf: MLP layer sizes after the 2m input (default 128,64)."
    ),
    pretrain_towers: bool | None = typer.Option(
        None,
        "--pretrain-towers/--no-pretrain-towers",
        help="neumf: train GMF and MLP alone first, start NeuMF from them (default off).",
    ),
    layers: int | None = typer.Option(None, "--layers", help="lightgcn: propagation layers K (default 3)."),
    patience: int | None = typer.Option(
        None, "--patience", help="Evaluations without improvement before stopping (default 10)."
    ),
    eval_every: int | None = typer.Option(None, "--eval-every", help="Validate every N epochs (default 1)."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda (default auto)."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the last epoch checkpoint of each seed and domain."
    ),
    config: Path | None = typer.Option(None, "--config", help="TOML file with any of these options; flags win."),
) -> None:
    """Train a single-domain baseline on each domain's train interactions (scored by `uclr evaluate`)."""
    kind = name.strip().lower()
    if kind not in registry.BASELINES:
        raise ConfigError(f"unknown baseline '{name}'; choose one of {', '.join(registry.BASELINES)}", "NAME")
    cli = dict(
        model=kind,
        domain=domain,
        data=data,
        run=run,
        seeds=training.seeds_option(seeds, seed),
        dim=dim,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        reg=reg,
        init_std=init_std,
        negatives=negatives,
        mlp_layers=common.csv_list(mlp_layers, "--mlp-layers", int),
        pretrain_towers=pretrain_towers,
        layers=layers,
        patience=patience,
        eval_every=eval_every,
        device=device,
    )
    cfg, ds, run_dir = training.resolve(BaselineConfig, cli, config)
    domains = ds.domains if cfg.domain == "all" else [ds.domains[ds.domain_index(cfg.domain)]]
    name_ = stage.stage_name(kind)
    training.write_config(run_dir, name_, cfg, ds)
    results = training.run_seeds(
        name_,
        cfg.seeds,
        lambda s, rep: [stage.run_domain(cfg, ds, run_dir, s, d, resume=resume, progress=rep) for d in domains],
    )
    training.print_summary(name_, training.merge_domains(results), ds.domains)
