"""Shared plumbing of the training commands: config merge, folders, progress, summary."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from uclr_cli import checkpoint as ckpt
from uclr_cli import config as cfgmod
from uclr_cli import distributed, layout, loop, memory
from uclr_cli.cli import common, options
from uclr_cli.data.dataset import MANIFEST, Dataset, load_prepared
from uclr_cli.errors import ConfigError, DataError, TrainingError, UclrError, os_reason
from uclr_cli.lock import RunLock
from uclr_cli.loop import EpochEvent, SeedResult

PROJECT_FILE = "uclr.toml"


def default_data_dir() -> Path:
    """`data` from ./uclr.toml, else the only prepared folder under ./data/."""
    proj = Path(PROJECT_FILE)
    if proj.is_file():
        try:
            conf = tomllib.loads(proj.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"invalid TOML: {e}", proj) from None
        if "data" in conf:
            if not isinstance(conf["data"], str) or not conf["data"].strip():
                raise ConfigError("data must be a folder path (string)", f"{proj}, key 'data'")
            return Path(conf["data"])
    found = sorted(p.parent for p in Path("data").glob(f"*/{MANIFEST}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError("no prepared folder under data/ (run `uclr prepare` or pass --data)", "--data")
    raise DataError(f"several prepared folders under data/ ({', '.join(p.name for p in found)}); pass --data", "--data")


def recorded_dataset(run_dir: Path) -> dict | None:
    """``{"name", "fingerprint", "path"?}`` from RUN/config.json; None when the run has no config.json yet."""
    path = Path(run_dir) / layout.CONFIG
    record = read_run_config(path).get("dataset")
    if record is None:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str):
        raise DataError("the run's config has no valid dataset record; pass --data", path)
    return record


def load_data(data: Path | None, run: Path | None) -> Dataset:
    """The prepared folder of a command: --data, else the one RUN/config.json records, else :func:`default_data_dir`.

    A folder found through the run's record must have the recorded fingerprint.
    """
    if data is not None:
        return load_prepared(Path(data))
    record = recorded_dataset(run) if run is not None else None
    if record is None:
        return load_prepared(default_data_dir())
    where = Path(run) / layout.CONFIG
    path = record.get("path")
    folder = Path(os.path.normpath(Path(run) / path)) if isinstance(path, str) else None
    if folder is None or not (folder / MANIFEST).is_file():
        try:
            folder = default_data_dir()
        except UclrError:
            gone = f"the prepared folder it records ({folder}) is gone" if folder else "it records no data folder"
            raise DataError(f"{gone}; pass --data", where) from None
    ds = load_prepared(folder)
    if ds.fingerprint != record["fingerprint"]:
        raise DataError(f"{folder} is not the data this run was trained on (fingerprint differs); pass --data", where)
    return ds


#: The stages that run data-parallel under torchrun (docs/distributed.md); the others are refused there.
DATA_PARALLEL = (
    cfgmod.PretrainConfig,
    cfgmod.ContrastConfig,
    cfgmod.FinetuneConfig,
    cfgmod.BaselineConfig,
    cfgmod.CatArtConfig,
)

#: The commands of the configs that are not named after their command.
COMMANDS = {
    cfgmod.CatArtConfig: "baseline cat-art",
    cfgmod.GaMtcdrConfig: "baseline ga-mtcdr",
    cfgmod.HeroGraphConfig: "baseline herograph",
}


def resolve(model: type[cfgmod.StageConfig], flags: dict[str, Any], config_file: Path | None, seed: int | None = None):
    """Model defaults < TOML values < flags given on the command line; unknown keys are an error naming the key."""
    if model not in DATA_PARALLEL:
        one_process_only(COMMANDS.get(model, model.__name__.removesuffix("Config").lower()))
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(cfgmod.read_toml(config_file))
    given = options.given(model, flags)
    if seed is not None:
        if "seeds" in given:
            raise ConfigError("give --seeds or --seed, not both", "--seed")
        given["seeds"] = [seed]
    values.update(given)

    def where_for(key: str) -> str:
        if key in given or config_file is None:
            return f"--{key.replace('_', '-')}" if key else "options"
        return f"{config_file}, key '{key}'"

    cfg = cfgmod.build(model, values, where_for)
    data = load_data(cfg.data, cfg.run)
    run_dir = Path(cfg.run) if cfg.run is not None else Path("runs") / data.name
    if isinstance(cfg, cfgmod.FinetuneConfig):
        check_rank(cfg.rank, run_dir, cfg.seeds, where_for("rank"))
    memory.check(cfg, data, run_dir, where_for)  # a config too large for this machine: refused before any work
    # one writer per run folder, held until the command ends (also on errors and Ctrl-C); under torchrun, rank 0
    if distributed.env_rank() == 0:
        common.hold(RunLock(run_dir, f"uclr {model.__name__.removesuffix('Config').lower()}"))
    return cfg, data, run_dir


def check_rank(rank: int, run_dir: Path, seeds: list[int], where: str) -> None:
    """LoRA rank must not exceed the PGE dimension, read from each seed's pretrain header (before any work)."""
    for s in seeds:
        path = layout.seed_dir(run_dir, s) / layout.PRETRAIN
        if not path.is_file():
            continue  # the stage reports the missing checkpoint
        dim = ckpt.read_header(path).get("dim")
        if isinstance(dim, int) and rank > dim:
            raise ConfigError(
                f"rank {rank} exceeds the embedding dimension {dim} of {path}: rank must be <= dim", where
            )


#: Stage configs waiting to be recorded in config.json by the running command (see :func:`write_config`).
_PENDING: list[tuple[Path, str, dict, dict]] = []


def read_run_config(path: Path) -> dict:
    """RUN/config.json as a dict ({} when absent); a file that is not a JSON object is refused, never replaced."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return {}
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        reason = os_reason(e) if isinstance(e, OSError) else "not valid JSON"
        raise ConfigError(
            f"cannot read the run's config record ({reason}); fix or remove it (it records each stage's config)", path
        ) from None
    if not isinstance(payload, dict):
        raise ConfigError("the run's config record is not a JSON object; fix or remove it", path)
    return payload


def write_config(run_dir: Path, stage: str, cfg: cfgmod.StageConfig, data: Dataset) -> None:
    """Record the resolved config of ``stage`` in RUN/config.json once the stage has started.

    A corrupt config.json is refused now, before any work. The record itself is
    written when the stage reports its first finished epoch (its checkpoints and
    resume state were accepted and it trained), or when the command ends
    without error if it reports none (e.g. a resume of a finished run): a stage
    refused before its first epoch leaves config.json as it was. ``dataset`` names
    the data and where it is, relative to the run folder (no absolute paths: both
    folders may move together), so later commands on the run find it without --data.
    """
    path = Path(run_dir) / layout.CONFIG
    read_run_config(path)
    if distributed.env_rank() != 0:  # under torchrun rank 0 records
        return
    if not _PENDING:
        common.hold(_pending_scope())
    _PENDING.append(
        (
            path,
            stage,
            cfg.model_dump(mode="json", exclude={"data", "run"}),
            {
                "name": data.name,
                "fingerprint": data.fingerprint,
                "path": os.path.relpath(Path(data.path).resolve(), Path(run_dir).resolve()),
            },
        )
    )


def record_configs() -> None:
    """Write the pending stage configs into config.json (merged with the other stages' records)."""
    while _PENDING:
        path, stage, conf, dataset = _PENDING[0]
        payload = read_run_config(path)
        payload["dataset"] = dataset
        payload[stage] = conf
        ckpt.write_json(path, payload)
        _PENDING.pop(0)


@contextlib.contextmanager
def _pending_scope():
    """Forget what the command did not record when it ends (an error before its first epoch)."""
    try:
        yield
    finally:
        _PENDING.clear()


def one_process_only(command: str) -> None:
    """Under torchrun with several ranks, a command that is not data-parallel is refused (every rank would
    train the same model and write the same files)."""
    size = distributed.env_world_size()
    if size > 1:
        raise ConfigError(
            f"uclr {command} runs in one process (only pretrain, contrast, finetune and baseline bprmf, lightgcn, "
            "neumf and cat-art are data-parallel); launch it without torchrun",
            f"WORLD_SIZE={size}",
        )


def join(
    cfg: cfgmod.StageConfig, batch_size: int | None = None, resume: bool = False, more: dict[str, int] | None = None
) -> distributed.World:
    """Join the process group when launched by ``torchrun`` (held until the command ends): rank 0 prints
    and writes, the others are quiet. ``batch_size``: the global batch, which every rank needs a share of
    (``more``: the other batch sizes by option, e.g. ``{"--cat-batch-size": 256}``).
    Under ``torchrun --max-restarts``, rank 0 says when this start is a restart, and what it continues from."""
    if distributed.env_rank() == 0:
        if warning := distributed.restart_warning():  # before joining: that is where a bad restart hangs
            common.warn(warning)
        count, allowed = distributed.restarts()
        if count > 0:
            then = "continues from the last resume state" if resume else "starts over (--resume would continue)"
            common.info(f"torchrun restart {count} of {allowed}: {then}")
    size = distributed.env_world_size()
    if size > 1:
        batches = ({"--batch-size": batch_size} if batch_size is not None else {}) | (more or {})
        for option, batch in batches.items():
            distributed.World(0, size).check_batch(batch, option)
    world = common.hold(distributed.joined(distributed.device_for(loop.resolve_device(cfg.device))))
    if not world.main:
        common.STATE.quiet = True
    return world


class Reporter:
    """Per-epoch progress: a Rich bar on a terminal, plain log lines otherwise."""

    def __init__(self, stage: str):
        self.stage = stage
        self.quiet = common.STATE.quiet
        self.tty = sys.stdout.isatty()
        self.console = common.out()
        self.progress: Progress | None = None
        self.task = None

    def __enter__(self) -> Reporter:
        if self.tty and not self.quiet:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
        if exc[0] is None:
            record_configs()

    def __call__(self, ev: EpochEvent) -> None:
        record_configs()  # the stage has started: its config is now worth recording
        if self.quiet:
            return
        extra = "".join(f" {k}={v}" for k, v in ev.extra.items())
        if ev.metric == "loss":  # stopped on its training loss: no validation score, best is the lowest loss
            scores = f"best_loss={ev.best:.4f}@{ev.best_epoch}"
        else:
            ndcg = "-" if ev.valid_ndcg is None or math.isnan(ev.valid_ndcg) else f"{ev.valid_ndcg:.4f}"
            scores = f"{ev.metric}={ndcg} best={ev.best:.4f}@{ev.best_epoch}"
        info = f"loss={ev.loss:.4f} {scores} {ev.samples_per_s:,.0f}/s{extra}"
        if self.progress is not None:
            desc = f"{ev.stage} seed {ev.seed}"
            if self.task is None or self.progress.tasks[self.task].description != desc:
                self.task = self.progress.add_task(desc, total=ev.epochs, info="")
            self.progress.update(self.task, completed=ev.epoch, info=info)
        else:
            self.console.print(f"{ev.stage} seed={ev.seed} epoch={ev.epoch}/{ev.epochs} {info}")


def summary_table(stage: str, results: list[SeedResult], domains: list[str]) -> Table:
    t = Table(title=f"{stage}: best validation NDCG@10 (%) per seed")
    for col in ("seed", "best epoch", "epochs run", *domains, "mean", "seconds"):
        t.add_column(col, justify="right")
    for r in results:
        cells = [
            f"{100 * r.per_domain[d]:.2f}" if d in r.per_domain and not math.isnan(r.per_domain[d]) else "-"
            for d in domains
        ]
        t.add_row(
            str(r.seed), str(r.best_epoch), str(r.epochs_run), *cells, f"{100 * r.best_score:.2f}", f"{r.seconds:.1f}"
        )
    return t


def run_seeds(
    stage: str, seeds: list[int], fn: Callable[[int, Reporter], SeedResult | list[SeedResult]]
) -> list[SeedResult]:
    results: list[SeedResult] = []
    with Reporter(stage) as rep, out_of_memory_is_an_error(stage):
        for s in seeds:
            r = fn(s, rep)
            results.extend(r if isinstance(r, list) else [r])
    return results


@contextlib.contextmanager
def out_of_memory_is_an_error(stage: str):
    """An allocator failure the estimate did not foresee is one line, not a traceback."""
    try:
        yield
    except Exception as e:
        if not memory.is_out_of_memory(e):
            raise
        raise TrainingError(
            f"out of memory in {stage} ({str(e).splitlines()[0][:80]}); try a smaller --dim, --hidden or --batch-size",
            stage,
        ) from None


def print_summary(stage: str, results: list[SeedResult], domains: list[str], extra: list[Table] | None = None) -> None:
    if common.STATE.quiet:
        return
    console = common.out()
    console.print(summary_table(stage, results, domains))
    for t in extra or []:
        console.print(t)


def chosen_domains(domain: str, data: Dataset) -> list[str]:
    """``--domain``: every domain for ``all``, else the one named (an unknown name is one line)."""
    return list(data.domains) if domain == "all" else [data.domains[data.domain_index(domain)]]


def merge_domains(results: list[SeedResult]) -> list[SeedResult]:
    """One row per seed for per-domain stages (finetune): domains side by side."""
    merged: dict[int, SeedResult] = {}
    for r in results:
        m = merged.get(r.seed)
        if m is None:
            merged[r.seed] = SeedResult(
                r.stage.split()[0],
                r.seed,
                r.path,
                r.best_epoch,
                r.best_score,
                r.epochs_run,
                r.seconds,
                dict(r.per_domain),
            )
            merged[r.seed].extra["best_epochs"] = {r.extra.get("domain"): r.best_epoch}
            continue
        m.per_domain.update(r.per_domain)
        m.seconds += r.seconds
        m.epochs_run = max(m.epochs_run, r.epochs_run)
        m.extra["best_epochs"][r.extra.get("domain")] = r.best_epoch
    for m in merged.values():
        vals = [v for v in m.per_domain.values() if not math.isnan(v)]
        m.best_score = sum(vals) / len(vals) if vals else math.nan
        m.best_epoch = "/".join(str(e) for e in m.extra["best_epochs"].values())
    return list(merged.values())
