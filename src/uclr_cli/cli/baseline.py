"""`uclr baseline NAME`: single-domain BPRMF, NeuMF or LightGCN per domain and seed (the paper's Table 2)."""

from __future__ import annotations

from typing import Annotated

import typer

from uclr_cli import registry
from uclr_cli.cli import options, training
from uclr_cli.config import BaselineConfig
from uclr_cli.errors import ConfigError
from uclr_cli.stages import baseline as stage


@options.from_model(BaselineConfig, exclude=["model"])
def baseline(
    flags,
    name: Annotated[str, typer.Argument(metavar="NAME", help="bprmf | neumf | lightgcn.")],
    seed: options.Seed = None,
    resume: options.Resume = False,
    config: options.Config = None,
) -> None:
    """Train a single-domain baseline on each domain's train interactions (scored by `uclr evaluate`)."""
    kind = name.strip().lower()
    if kind not in registry.BASELINES:
        raise ConfigError(f"unknown baseline '{name}'; choose one of {', '.join(registry.BASELINES)}", "NAME")
    cfg, ds, run_dir = training.resolve(BaselineConfig, {**flags, "model": kind}, config, seed)
    domains = ds.domains if cfg.domain == "all" else [ds.domains[ds.domain_index(cfg.domain)]]
    name_ = stage.stage_name(kind)
    training.write_config(run_dir, name_, cfg, ds)
    results = training.run_seeds(
        name_,
        cfg.seeds,
        lambda s, rep: [stage.run_domain(cfg, ds, run_dir, s, d, resume=resume, progress=rep) for d in domains],
    )
    training.print_summary(name_, training.merge_domains(results), ds.domains)
