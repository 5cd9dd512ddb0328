"""`uclr ablate`: train and evaluate the paper's five ablation variants for every seed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from uclr_cli import config as cfgmod
from uclr_cli import loop, memory
from uclr_cli import pipeline as stage
from uclr_cli.cli import common, options, training
from uclr_cli.config import ABLATE_OWNS, ABLATE_STAGES, AblateConfig
from uclr_cli.errors import ConfigError
from uclr_cli.lock import RunLock

SET_HELP = "One stage option, e.g. pretrain.epochs=3 or contrast.hidden=16,8 (repeatable)."
CONFIG_HELP = (
    "TOML with top-level data/run/seeds/domains/device/k and \\[pretrain], \\[contrast], \\[finetune] tables "
    "of stage options. Flags win over --set, --set over this file."
)


@options.from_model(AblateConfig, exclude=ABLATE_STAGES)
def ablate(
    flags,
    config: Annotated[Path | None, typer.Option("--config", help=CONFIG_HELP)] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="STAGE.KEY=VALUE", help=SET_HELP)] = None,
) -> None:
    """Train PGE, PGE+AE, PGE+CL-AE, PGE+UCL-AE and UCLR per seed, skip what exists, print Table 4."""
    file = cfgmod.read_toml(config) if config is not None else {}
    given = options.given(AblateConfig, flags)

    def where_top(key: str) -> str:
        return f"--{key}" if key in given or config is None else f"{config}, key '{key}'"

    cfgmod.build(AblateConfig, file, lambda key: f"{config}, key '{key}'")  # a bad key is refused even under a flag
    top = cfgmod.build(AblateConfig, {**file, **given}, where_top)
    overrides = parse_sets(set_ or [])
    cfgs = {name: stage_config(name, top, config, overrides[name]) for name in ABLATE_STAGES}
    if cfgs["finetune"].rank > cfgs["pretrain"].dim:
        section, key = (
            ("finetune", "rank") if "rank" in {**top.finetune, **overrides["finetune"]} else ("pretrain", "dim")
        )
        where = f"--set {section}.{key}" if key in overrides[section] else f"{config}, [{section}] key '{key}'"
        raise ConfigError(
            f"rank {cfgs['finetune'].rank} exceeds the pretrain dim {cfgs['pretrain'].dim}: rank must be <= dim", where
        )
    training.one_process_only("ablate")
    loop.resolve_device(top.device)  # `--device cuda` without one: refused now, not after the training
    ds = training.load_data(top.data, top.run)
    run_dir = Path(top.run) if top.run is not None else Path("runs") / ds.name
    unknown = [d for d in top.domains or [] if d not in ds.domains]
    if unknown:
        raise ConfigError(f"unknown domain '{unknown[0]}'; available: {', '.join(ds.domains)}", where_top("domains"))
    domain_list = top.domains or ds.domains
    for name, cfg in cfgs.items():  # a config too large for this machine: refused before any work
        memory.check(
            cfg,
            ds,
            run_dir,
            lambda key, n=name: f"{config}, [{n}] key '{key}'" if config else f"--{key}",
            dim=cfgs["pretrain"].dim,
        )
    common.hold(RunLock(run_dir, "uclr ablate"))  # one writer per run folder until the command ends
    for name, cfg in cfgs.items():
        training.write_config(run_dir, f"ablate-{name}", cfg, ds)

    def on_step(ev: stage.StepEvent) -> None:
        st = ev.step
        what = f"{st.variant} seed {st.seed}: {st.stage}{' ' + st.detail if st.detail else ''}"
        eta = f", about {ev.eta_s / 60:.1f} min left" if ev.eta_s is not None else ""
        common.info(f"[{ev.index}/{ev.total}] {what}{' (done, skipped)' if ev.skipped else ''}{eta}")

    with training.Reporter("ablate") as rep:
        stage.run(
            ds,
            run_dir,
            top.seeds,
            domain_list,
            cfgs["pretrain"],
            cfgs["contrast"],
            cfgs["finetune"],
            on_step=on_step,
            progress=rep,
        )
    show_ablation(ds, run_dir, top.k, top.device)


def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--set pretrain.epochs=3`` -> ``{"pretrain": {"epochs": 3}, ...}``, typed by the stage's model."""
    out: dict[str, dict[str, Any]] = {name: {} for name in ABLATE_STAGES}
    for item in items:
        where = f"--set {item}"
        target, eq, text = item.partition("=")
        name, dot, key = target.strip().partition(".")
        key = key.strip().replace("-", "_")
        if not eq or not dot or not key:
            raise ConfigError("expected STAGE.KEY=VALUE, e.g. pretrain.epochs=3", where)
        if name not in ABLATE_STAGES:
            raise ConfigError(f"unknown stage '{name}'; choose one of {', '.join(ABLATE_STAGES)}", where)
        model = ABLATE_STAGES[name]
        if key not in model.model_fields:
            raise ConfigError(f"unknown key '{key}' of [{name}]", where)
        _check_owned(key, where)
        try:
            out[name][key] = cfgmod.value_from_text(model, key, text)
        except ValueError as e:
            raise ConfigError(str(e), where) from None
    return out


def _check_owned(key: str, where: str) -> None:
    if key in ABLATE_OWNS:
        raise ConfigError(f"'{key}' cannot be set per stage: {ABLATE_OWNS[key]}", where)


def stage_config(name: str, top: AblateConfig, config: Path | None, sets: dict[str, Any]) -> cfgmod.StageConfig:
    """One stage's config: its TOML table < its --set values; seeds and device from the top level."""
    table = {k.replace("-", "_"): v for k, v in getattr(top, name).items()}
    for key in table:
        _check_owned(key, f"{config}, [{name}] key '{key}'")

    def where(key: str) -> str:
        return f"--set {name}.{key}" if key in sets or config is None else f"{config}, [{name}] key '{key}'"

    values = {**table, **sets, "seeds": top.seeds, "device": top.device}
    return cfgmod.build(ABLATE_STAGES[name], values, where)


def show_ablation(ds, run_dir: Path, ks: list[int], device: str) -> None:
    """The Table 4 layout: rows domain x variant (floors first), test metrics mean ± std over seeds."""
    from uclr_cli import report
    from uclr_cli.registry import VARIANTS
    from uclr_cli.stages import evaluate

    result = evaluate.run(ds, run_dir, split="test", ks=ks, device=device, variants=list(VARIANTS))
    for w in result.warnings:
        common.warn(w)
    console = common.out()
    for table in report.eval_tables(result.report):
        console.print(table)
