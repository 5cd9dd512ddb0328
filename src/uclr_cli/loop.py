"""What every training stage shares: device, seeding, progress events, validation, the epoch/resume skeleton."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uclr_cli import checkpoint as ckpt
from uclr_cli import layout
from uclr_cli.data.dataset import Dataset, EvalSplit
from uclr_cli.errors import CheckpointError, ConfigError, DataError, TrainingError
from uclr_cli.metrics import rank_candidates, summarize


@dataclass
class EpochEvent:
    """Progress of one epoch, reported through the stage's callback."""

    stage: str
    seed: int
    epoch: int
    epochs: int
    loss: float
    valid_ndcg: float | None
    samples_per_s: float  # training only, see Throughput
    best: float
    best_epoch: int
    extra: dict = field(default_factory=dict)
    epoch_s: float = math.nan  # this epoch's training seconds (batch loop only)


@dataclass
class SeedResult:
    """What one seed of one stage ended with."""

    stage: str
    seed: int
    path: Path
    best_epoch: int
    best_score: float
    epochs_run: int
    seconds: float
    per_domain: dict[str, float]  # valid NDCG@10 per domain at the best epoch
    extra: dict = field(default_factory=dict)


Progress = Callable[[EpochEvent], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA was asked for but no CUDA device is available", "--device")
    return torch.device(name)


def generator(device: torch.device, seed: int, stream: int) -> torch.Generator:
    """A sampling generator per (seed, stage): independent of global RNG state."""
    g = torch.Generator(device=device)
    value = seed * 1_000_003 + stream
    if not 0 <= value < 1 << 64:  # beyond manual_seed's range: fold (seed, stream) into 64 bits by a hash
        import hashlib

        value = int.from_bytes(hashlib.sha256(f"{seed}:{stream}".encode()).digest()[:8], "little")
    g.manual_seed(value)
    return g


def valid_scores(
    data: Dataset,
    users_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    split: dict[str, EvalSplit],
    domains: list[str] | None = None,
    k: int = 10,
) -> dict[str, float]:
    """NDCG@k per domain on fixed candidates (NaN for a domain without rows)."""
    out = {}
    dev = users_vecs.device
    for name in domains or data.domains:
        ev = split[name]
        if len(ev.users) == 0:
            out[name] = math.nan
            continue
        ranks = rank_candidates(users_vecs, item_vecs, ev.users.to(dev), ev.pos.to(dev), ev.negs.to(dev))
        out[name] = float(summarize(ranks, [k])[("ndcg", k)])
    return out


def mean_score(per_domain: dict[str, float]) -> float:
    vals = [v for v in per_domain.values() if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def check_finite(loss: float, stage: str, seed: int, epoch: int) -> None:
    if not math.isfinite(loss):
        raise TrainingError(
            f"non-finite loss in {stage}, seed {seed}, epoch {epoch}; the last good checkpoint is kept "
            "(try --resume with a lower --lr)",
            f"{stage} seed {seed}",
        )


def base_meta(stage: str, data: Dataset, seed: int, config: dict, **extra) -> dict:
    return {"stage": stage, "dataset": data.fingerprint, "seed": seed, "config": config, **extra}


def require(path: Path, what: str) -> Path:
    if not Path(path).is_file():
        raise DataError(f"{what} is missing (run `uclr {what.split()[0]}` for this seed first)", path)
    return path


class Throughput:
    """Training samples per second: batch loops only (validation and saving are not timed), summed over
    the epochs this process has run, so one noisy or warm-up epoch does not swing the figure."""

    def __init__(self) -> None:
        self.samples, self.seconds = 0, 0.0

    def add(self, samples: int, seconds: float) -> float:
        self.samples += samples
        self.seconds += seconds
        return self.samples / max(self.seconds, 1e-9)


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


# --- the epoch/resume skeleton ---------------------------------------------------------------------------------


class Schedule:
    """Epochs, validation cadence and early stopping of one training run, restorable from a resume state.

    Each stage writes its own loop::

        for epoch in sched.epochs_to_run():
            ...batches...
            score, improved = sched.validate(epoch, valid_fn)
            if improved: save the best checkpoint
            done = sched.done(epoch)
            out.save_state(...)                   # the resume state (out: Outputs)
            if done: break

    ``best_score`` starts at -inf; a stage whose epoch 0 counts (finetune: the
    untrained adapter is the contrast model) calls :meth:`start_from` first.
    """

    def __init__(self, epochs: int, patience: int, eval_every: int):
        self.epochs, self.patience, self.eval_every = epochs, patience, eval_every
        self.start, self.last = 1, 0
        self.best, self.best_epoch, self.bad = -math.inf, 0, 0
        self.per_domain: dict[str, float] = {}
        self.throughput, self.epoch_s = Throughput(), math.nan

    def start_from(self, per_domain: dict[str, float]) -> None:
        """Make the starting model (epoch 0) the one to beat."""
        self.best, self.best_epoch, self.per_domain = mean_score(per_domain), 0, per_domain

    def epochs_to_run(self):
        for epoch in range(self.start, self.epochs + 1):
            self.last = epoch
            yield epoch

    @property
    def epochs_run(self) -> int:
        return max(self.last, self.start - 1)

    def validate(self, epoch: int, score: Callable[[], dict[str, float]]) -> tuple[float | None, bool]:
        """Score on validation when due (every ``eval_every`` and the last epoch): (mean or None, improved)."""
        if epoch % self.eval_every and epoch != self.epochs:
            return None, False
        per_domain = score()
        value = mean_score(per_domain)
        if value > self.best:
            self.best, self.best_epoch, self.bad, self.per_domain = value, epoch, 0, per_domain
            return value, True
        self.bad += 1
        return value, False

    def trained(self, samples: int, seconds: float) -> None:
        """Record an epoch's training (batch loop only) for the throughput figure."""
        self.epoch_s = seconds
        self.throughput.add(samples, seconds)

    def event(self, stage: str, seed: int, epoch: int, loss: float, score: float | None, extra=None) -> EpochEvent:
        t = self.throughput
        speed = t.samples / max(t.seconds, 1e-9)
        return EpochEvent(
            stage, seed, epoch, self.epochs, loss, score, speed, self.best, self.best_epoch, extra or {}, self.epoch_s
        )

    def result(self, stage: str, seed: int, path: Path, timer: Timer, per_domain=None, extra=None) -> SeedResult:
        per_domain = self.per_domain if per_domain is None else per_domain
        return SeedResult(
            stage, seed, path, self.best_epoch, self.best, self.epochs_run, timer.elapsed(), per_domain, extra or {}
        )

    def done(self, epoch: int) -> bool:
        return self.bad >= self.patience or epoch == self.epochs

    def meta(self, epoch: int, done: bool) -> dict:
        return {
            "epoch": epoch,
            "best_score": self.best,
            "best_epoch": self.best_epoch,
            "bad": self.bad,
            "per_domain": self.per_domain,
            "done": done,
        }

    def restore(self, meta: dict) -> None:
        """Continue after the epoch a resume state was saved at; a finished run stays finished
        unless ``epochs`` grew (then it continues)."""
        self.best, self.best_epoch, self.bad = meta["best_score"], meta["best_epoch"], meta["bad"]
        self.per_domain = meta.get("per_domain") or {}
        self.start = meta["epoch"] + 1
        if meta["bad"] >= self.patience or meta["epoch"] >= self.epochs:
            self.start = self.epochs + 1


@dataclass
class Outputs:
    """One stage's files for one seed (the best checkpoint and its resume state) and what their headers carry.

    ``meta`` holds what both headers record besides the stage, dataset, seed and
    config (shapes, the sha256 of the checkpoints the stage was built from...).
    """

    stage: str
    data: Dataset
    seed: int
    config: dict
    best: Path
    state: Path
    meta: dict = field(default_factory=dict)

    @classmethod
    def of(cls, stage: str, data: Dataset, run_dir: Path, seed: int, name: str, config: dict) -> Outputs:
        folder = layout.seed_dir(run_dir, seed)
        return cls(stage, data, seed, config, folder / name, folder / layout.resume_name(name))

    def save_best(self, tensors: dict[str, torch.Tensor], epoch: int, best: float) -> None:
        meta = base_meta(self.stage, self.data, self.seed, self.config, epoch=epoch, best_score=best, **self.meta)
        ckpt.save(self.best, tensors, meta)

    def load_state(self, sched: Schedule, gen: torch.Generator, expect: dict | None = None) -> dict[str, torch.Tensor]:
        """Read the resume state (checked: stage, dataset, seed, config but the settings a resume may change,
        and ``expect``), restore ``sched`` and ``gen``; the stage restores its own tensors from the result."""
        t, meta = ckpt.load(
            self.state,
            stage=self.stage + "-resume",
            fingerprint=self.data.fingerprint,
            expect={"config": self.config, "seed": self.seed, **(expect or {})},
            may_differ={"config": ckpt.RESUME_MAY_DIFFER},
        )
        if "rng" not in t:
            raise CheckpointError("resume state has no generator state (tensor 'rng')", self.state)
        sched.restore(meta)
        gen.set_state(t["rng"].to(torch.uint8))
        return t

    def save_state(
        self, sched: Schedule, epoch: int, done: bool, tensors: dict[str, torch.Tensor], gen: torch.Generator
    ) -> None:
        """Write the resume state after ``epoch``: the stage's tensors, the generator and the schedule."""
        meta = base_meta(self.stage + "-resume", self.data, self.seed, self.config, **sched.meta(epoch, done))
        ckpt.save(self.state, {**tensors, "rng": gen.get_state()}, {**meta, **self.meta})


def restore(tensors: dict[str, torch.Tensor], into: dict[str, torch.Tensor], path: Path) -> None:
    """Copy the named resume tensors into the live ones (same shapes), naming a missing one."""
    with torch.no_grad():
        for name, live in into.items():
            if name not in tensors:
                raise CheckpointError(f"resume state has no tensor '{name}'", path)
            if tensors[name].shape != live.shape:
                raise CheckpointError(f"resume tensor '{name}' has shape {list(tensors[name].shape)}", path)
            live.copy_(tensors[name])
