"""The paper's ablation (Table 4): PGE, PGE+AE, PGE+CL-AE, PGE+UCL-AE, UCLR per seed.

The variants of a seed share its PGE checkpoint. Work that already exists and
is valid (same dataset, same settings, finished) is skipped, and an
interrupted step continues from its resume state, so rerunning an
interrupted ablation picks up where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from uclr_cli import checkpoint as ckpt
from uclr_cli import layout, loop
from uclr_cli.config import ContrastConfig, FinetuneConfig, PretrainConfig
from uclr_cli.data.dataset import Dataset, sha256_file
from uclr_cli.errors import CheckpointError
from uclr_cli.stages import contrast, finetune, pretrain


@dataclass
class Step:
    seed: int
    variant: str  # PGE, PGE+AE, PGE+CL-AE, PGE+UCL-AE, UCLR
    stage: str  # pretrain, contrast, finetune
    detail: str  # temperature mode or domain
    path: Path


@dataclass
class StepEvent:
    """Ablation progress: which step runs now, how many are done, time left."""

    step: Step
    index: int
    total: int
    skipped: bool
    eta_s: float | None


def plan(data: Dataset, run_dir: Path, seeds: list[int], domains: list[str]) -> list[Step]:
    steps = []
    for s in seeds:
        sd = layout.seed_dir(run_dir, s)
        steps.append(Step(s, "PGE", "pretrain", "", sd / layout.PRETRAIN))
        for variant, mode in (("PGE+AE", "none"), ("PGE+CL-AE", "global"), ("PGE+UCL-AE", "individual")):
            steps.append(Step(s, variant, "contrast", mode, sd / layout.CONTRAST[mode]))
        for d in domains:
            steps.append(Step(s, "UCLR", "finetune", d, sd / layout.finetune_name(d)))
    return steps


def _config_of(cfg) -> dict:
    exclude = {"data", "run", "seeds", "domain"}
    return cfg.model_dump(mode="json", exclude=exclude)


def _same_config(saved, cfg) -> bool:
    """The saved config is this one (a saved config that predates an added key counts at the key's old value)."""
    want = _config_of(cfg)
    return isinstance(saved, dict) and ckpt.with_added_keys(saved, want) == want


def is_done(step: Step, data: Dataset, cfg) -> bool:
    """The step's checkpoint exists, matches dataset, settings and inputs, and its run finished."""
    state = step.path.with_name(layout.resume_name(step.path.name))
    try:
        meta = ckpt.read_header(step.path)
        smeta = ckpt.read_header(state)
    except CheckpointError:
        return False
    if meta.get("dataset") != data.fingerprint or not _same_config(meta.get("config"), cfg) or not smeta.get("done"):
        return False
    sd = step.path.parent
    if step.stage == "contrast":
        return meta.get("pretrain_sha256") == sha256_file(sd / layout.PRETRAIN)
    if step.stage == "finetune":
        con = sd / layout.CONTRAST["individual"]
        return con.is_file() and meta.get("contrast_sha256") == sha256_file(con)
    return True


def can_resume(step: Step, data: Dataset, cfg) -> bool:
    """An unfinished resume state of the same dataset and settings exists (else start afresh)."""
    try:
        smeta = ckpt.read_header(step.path.with_name(layout.resume_name(step.path.name)))
    except CheckpointError:
        return False
    return smeta.get("dataset") == data.fingerprint and _same_config(smeta.get("config"), cfg)


def run(
    data: Dataset,
    run_dir: Path,
    seeds: list[int],
    domains: list[str],
    pre: PretrainConfig,
    con: ContrastConfig,
    ft: FinetuneConfig,
    *,
    on_step: Callable[[StepEvent], None] | None = None,
    progress: loop.Progress | None = None,
) -> list[loop.SeedResult]:
    """Train every missing or stale step, in order; returns what was trained."""
    steps = plan(data, run_dir, seeds, domains)
    timer = loop.Timer()
    trained_time, trained_n = 0.0, 0
    out = []
    for k, st in enumerate(steps):
        if st.stage == "pretrain":
            cfg = pre
        elif st.stage == "contrast":
            cfg = con.model_copy(update={"temperature": st.detail})
        else:
            cfg = ft.model_copy(update={"domain": st.detail})
        skipped = is_done(st, data, cfg)
        left = len(steps) - k
        eta = trained_time / trained_n * left if trained_n else None
        if on_step:
            on_step(StepEvent(st, k + 1, len(steps), skipped, eta))
        if skipped:
            continue
        t0 = timer.elapsed()
        resume = can_resume(st, data, cfg)
        if st.stage == "pretrain":
            out.append(pretrain.run_seed(cfg, data, run_dir, st.seed, resume=resume, progress=progress))
        elif st.stage == "contrast":
            out.append(contrast.run_seed(cfg, data, run_dir, st.seed, resume=resume, progress=progress))
        else:
            out.append(finetune.run_domain(cfg, data, run_dir, st.seed, st.detail, resume=resume, progress=progress))
        trained_time += timer.elapsed() - t0
        trained_n += 1
    return out
