"""`uclr ablate`: train and evaluate the paper's five ablation variants for every seed."""

from __future__ import annotations

from pathlib import Path

import typer

from uclr_cli import config as cfgmod
from uclr_cli import memory
from uclr_cli import pipeline as stage
from uclr_cli.cli import common, training
from uclr_cli.config import ContrastConfig, FinetuneConfig, PretrainConfig
from uclr_cli.data.dataset import load_prepared
from uclr_cli.errors import ConfigError
from uclr_cli.lock import RunLock

SECTIONS = {"pretrain": PretrainConfig, "contrast": ContrastConfig, "finetune": FinetuneConfig}
TOP = {"seeds", "domains", "device", "data", "run"}


def ablate(
    data: Path | None = typer.Option(None, "--data", help="Prepared folder (default: the only one under data/)."),
    run: Path | None = typer.Option(None, "--run", help="Run folder (default: runs/<dataset name>)."),
    seeds: str | None = typer.Option(None, "--seeds", help="Comma-separated seeds (default 0,1,2,3,4)."),
    domains: str | None = typer.Option(None, "--domains", help="Domains to finetune and report (default all)."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda."),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="TOML with top-level seeds/domains/device and [pretrain], [contrast], [finetune] tables of stage options.",
    ),
    k: str = typer.Option("10", "--k", help="Cut-offs of the final table, e.g. 10,20."),
) -> None:
    """Train PGE, PGE+AE, PGE+CL-AE, PGE+UCL-AE and UCLR per seed, skip what exists, print Table 4."""
    file = cfgmod.read_toml(config) if config is not None else {}
    unknown = set(file) - TOP - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown key: {sorted(unknown)[0]}", config)
    for key in TOP & set(file):
        _check_top(key, file[key], config)
    top = {
        **{k_: v for k_, v in file.items() if k_ in TOP},
        **common.drop_none(dict(data=data, run=run, device=device)),
    }
    seed_list = common.csv_list(seeds, "--seeds", int) or top.get("seeds") or [0, 1, 2, 3, 4]
    cfgs = {}
    for name, model in SECTIONS.items():
        values = {k_.replace("-", "_"): v for k_, v in (file.get(name) or {}).items()}
        values["seeds"] = seed_list
        if "device" in top:
            values["device"] = top["device"]
        cfgs[name] = cfgmod.build(
            model, values, lambda key, n=name: f"{config}, [{n}] key '{key}'" if config else f"--{key}"
        )
    if cfgs["finetune"].rank > cfgs["pretrain"].dim:
        section, key = ("finetune", "rank") if "rank" in (file.get("finetune") or {}) else ("pretrain", "dim")
        where = f"{config}, [{section}] key '{key}'"
        raise ConfigError(
            f"rank {cfgs['finetune'].rank} exceeds the pretrain dim {cfgs['pretrain'].dim}: rank must be <= dim", where
        )
    ds = load_prepared(Path(top["data"]) if "data" in top else training.default_data_dir())
    run_dir = Path(top["run"]) if "run" in top else Path("runs") / ds.name
    wanted = common.csv_list(domains, "--domains") or top.get("domains") or ds.domains
    domain_list = [ds.domains[ds.domain_index(d)] for d in wanted]
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
            seed_list,
            domain_list,
            cfgs["pretrain"],
            cfgs["contrast"],
            cfgs["finetune"],
            on_step=on_step,
            progress=rep,
        )
    show_ablation(ds, run_dir, common.csv_list(k, "--k", int), device or top.get("device", "auto"))


def _check_top(key: str, value, config: Path | None) -> None:
    """Top-level keys of the ablate TOML: right type, else an error naming the key."""
    if key == "seeds":
        ok = (
            isinstance(value, list)
            and value
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        )
        what = "a non-empty list of integers >= 0"
    elif key == "domains":
        ok = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
        what = "a non-empty list of domain names"
    elif key == "device":
        ok = value in ("auto", "cpu", "cuda")
        what = "one of auto, cpu, cuda"
    else:  # data, run
        ok = isinstance(value, str) and value.strip() != ""
        what = "a folder path (string)"
    if not ok:
        raise ConfigError(f"{key} must be {what}", f"{config}, key '{key}'")


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
