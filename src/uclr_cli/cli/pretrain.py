"""`uclr pretrain`: PGE embeddings (BPR-MF over all domains), one checkpoint per seed."""

from __future__ import annotations

from uclr_cli import distributed, loop, sharded
from uclr_cli.cli import options, training
from uclr_cli.config import PretrainConfig
from uclr_cli.stages import pretrain as stage


@options.from_model(PretrainConfig)
def pretrain(flags, seed: options.Seed = None, resume: options.Resume = False, config: options.Config = None) -> None:
    """Pretrain global user and item embeddings (PGE) over all domains."""
    cfg, ds, run_dir = training.resolve(PretrainConfig, flags, config, seed)
    sharded.require(cfg.sharding, loop.resolve_device(cfg.device), distributed.env_world_size())  # else one line
    world = training.join(cfg, cfg.batch_size, resume)  # under torchrun: data-parallel (docs/distributed.md)
    training.write_config(run_dir, stage.STAGE, cfg, ds)
    results = training.run_seeds(
        stage.STAGE,
        cfg.seeds,
        lambda s, rep: stage.run_seed(cfg, ds, run_dir, s, resume=resume, progress=rep, world=world),
    )
    training.print_summary(stage.STAGE, results, ds.domains)
