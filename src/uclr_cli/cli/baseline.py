"""`uclr baseline NAME`: the paper's Table 2 baselines per domain and seed, scored by `uclr evaluate`.

Single-domain BPRMF, NeuMF and LightGCN (options: BaselineConfig), and the
cross-domain CAT-ART (options: CatArtConfig), GA-MTCDR (options:
GaMtcdrConfig) and HeroGraph (options: HeroGraphConfig); each NAME is a
subcommand, so its help lists only the options it reads.
"""

from __future__ import annotations

import typer

from uclr_cli import registry
from uclr_cli.cli import common, options, training
from uclr_cli.config import BASELINE_DEFAULTS, BaselineConfig, CatArtConfig, GaMtcdrConfig, HeroGraphConfig
from uclr_cli.errors import ConfigError
from uclr_cli.stages import baseline as stage
from uclr_cli.stages import cat_art, ga_mtcdr, herograph


class BaselineGroup(common.UclrGroup):
    """An unknown NAME is one line listing the known ones (not click's usage error)."""

    def resolve_command(self, ctx, args):
        if args and not args[0].startswith("-") and args[0].strip().lower() not in self.commands:
            raise ConfigError(f"unknown baseline '{args[0]}'; choose one of {', '.join(registry.BASELINES)}", "NAME")
        if args and args[0] != args[0].strip().lower():
            args = [args[0].strip().lower(), *args[1:]]
        return super().resolve_command(ctx, args)


app = typer.Typer(
    name="baseline",
    cls=BaselineGroup,
    help="Train a baseline on each domain's train interactions (scored by `uclr evaluate`).",
    subcommand_metavar="NAME [OPTIONS]",
    no_args_is_help=False,
    rich_markup_mode="rich",
)


def _single_domain(kind: str):
    @options.from_model(BaselineConfig, exclude=["model"], defaults=BASELINE_DEFAULTS.get(kind))
    def command(
        flags,
        seed: options.Seed = None,
        resume: options.Resume = False,
        config: options.Config = None,
    ) -> None:
        cfg, ds, run_dir = training.resolve(BaselineConfig, {**flags, "model": kind}, config, seed)
        domains = training.chosen_domains(cfg.domain, ds)
        world = training.join(cfg, cfg.batch_size, resume)  # under torchrun: data-parallel (docs/distributed.md)
        name_ = stage.stage_name(kind)
        training.write_config(run_dir, name_, cfg, ds)

        def seed_(s: int, rep: training.Reporter) -> list:
            return [stage.run_domain(cfg, ds, run_dir, s, d, resume=resume, progress=rep, world=world) for d in domains]

        results = training.run_seeds(name_, cfg.seeds, seed_)
        training.print_summary(name_, training.merge_domains(results), ds.domains)

    command.__doc__ = f"Train single-domain {registry.BASELINES[kind]} on each domain's train interactions."
    return command


for _kind in ("bprmf", "neumf", "lightgcn"):
    app.command(_kind)(_single_domain(_kind))


@app.command("cat-art")
@options.from_model(CatArtConfig)
def cat_art_command(
    flags,
    seed: options.Seed = None,
    resume: options.Resume = False,
    config: options.Config = None,
) -> None:
    """Train CAT-ART (Li et al., WSDM 2023): BPR-MF per domain, the contrastive autoencoder CAT, ART per target."""
    # CAT has no ranking to report
    reported = (cat_art.MF, cat_art.ART)
    _cross_domain(CatArtConfig, cat_art.ART, cat_art.run_seed, reported, flags, config, seed, resume, parallel=True)


@app.command("ga-mtcdr")
@options.from_model(GaMtcdrConfig)
def ga_mtcdr_command(
    flags,
    seed: options.Seed = None,
    resume: options.Resume = False,
    config: options.Config = None,
) -> None:
    """Train GA-MTCDR (Zhu et al., TKDE 2023), interaction-only variant (no text side-information): DeepWalk +
    skip-gram per domain, then element-wise attention and towers per target, trained round-robin."""
    # the walks have no model to report
    _cross_domain(GaMtcdrConfig, ga_mtcdr.TARGET, ga_mtcdr.run_seed, (ga_mtcdr.TARGET,), flags, config, seed, resume)


@app.command("herograph")
@options.from_model(HeroGraphConfig)
def herograph_command(
    flags,
    seed: options.Seed = None,
    resume: options.Resume = False,
    config: options.Config = None,
) -> None:
    """Train HeroGraph (Cui et al., 2020), reconstructed from the paper's description (its code is not public): a
    shared graph of every domain, recurrent attention (GRU) over sampled neighbours, per-domain tables, BPR."""
    _cross_domain(
        HeroGraphConfig, herograph.TARGET, herograph.run_seed, (herograph.TARGET,), flags, config, seed, resume
    )


def _cross_domain(
    model, name: str, run_seed, reported: tuple[str, ...], flags, config, seed, resume, parallel: bool = False
) -> None:
    """A cross-domain baseline: every seed's stages over all domains (targets: ``--domain``), then one summary
    per stage in ``reported``. ``parallel``: data-parallel under torchrun (``run_seed`` takes the world)."""
    cfg, ds, run_dir = training.resolve(model, flags, config, seed)
    domains = training.chosen_domains(cfg.domain, ds)
    kw = {}
    if parallel:  # under torchrun: data-parallel (docs/distributed.md)
        kw["world"] = training.join(cfg, cfg.batch_size, resume, {"--cat-batch-size": cfg.cat_batch_size})
    training.write_config(run_dir, name, cfg, ds)
    results = training.run_seeds(
        name, cfg.seeds, lambda s, rep: run_seed(cfg, ds, run_dir, s, domains, resume=resume, progress=rep, **kw)
    )
    for stage_ in reported:
        rows = [r for r in results if r.stage.split()[0] == stage_]
        training.print_summary(stage_, training.merge_domains(rows), ds.domains)
