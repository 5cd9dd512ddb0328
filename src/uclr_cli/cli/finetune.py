"""`uclr finetune`: domain-aware LoRA finetuning, one adapter per domain and seed."""

from __future__ import annotations

from uclr_cli.cli import options, training
from uclr_cli.config import FinetuneConfig
from uclr_cli.stages import finetune as stage


@options.from_model(FinetuneConfig)
def finetune(flags, seed: options.Seed = None, resume: options.Resume = False, config: options.Config = None) -> None:
    """Finetune the whole framework per domain with LoRA on the user table."""
    cfg, ds, run_dir = training.resolve(FinetuneConfig, flags, config, seed)
    domains = ds.domains if cfg.domain == "all" else [ds.domains[ds.domain_index(cfg.domain)]]
    world = training.join(cfg, cfg.batch_size, resume)  # under torchrun: data-parallel (docs/distributed.md)
    training.write_config(run_dir, stage.STAGE, cfg, ds)

    def seed(s: int, rep: training.Reporter) -> list:
        return [stage.run_domain(cfg, ds, run_dir, s, d, resume=resume, progress=rep, world=world) for d in domains]

    results = training.run_seeds(stage.STAGE, cfg.seeds, seed)
    training.print_summary(stage.STAGE, training.merge_domains(results), ds.domains)
