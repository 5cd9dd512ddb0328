"""What every training stage shares: device, seeding, progress events, validation, the epoch/resume skeleton."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uclr_cli import checkpoint as ckpt
from uclr_cli import dcp, distributed, layout
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
    #: what ``best`` measures: validation NDCG@10 (``valid_ndcg`` this epoch's), or ``"loss"`` for a stage stopped
    #: on its training loss (``best``: the lowest epoch loss; ``valid_ndcg`` None)
    metric: str = "valid_ndcg@10"


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
        if Path(path).with_name(layout.dcp_name(Path(path).name)).is_dir():
            raise DataError(
                f"{what} is missing; an unfinished torchrun run left its DCP state: run `uclr consolidate`", path
            )
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


def joint_results(stage: str, seed: int, sched: Schedule, paths: dict[str, Path], timer: Timer) -> list[SeedResult]:
    """One result per target domain of a joint run over several (``paths``: each target's best checkpoint):
    the shared schedule's best epoch, the domain's own score, and an equal share of the run's seconds (so the
    rows add up to the run)."""
    share = timer.elapsed() / max(len(paths), 1)
    return [
        SeedResult(
            f"{stage} {dom}",
            seed,
            path,
            sched.best_epoch,
            sched.per_domain.get(dom, math.nan),
            sched.epochs_run,
            share,
            {dom: sched.per_domain.get(dom, math.nan)},
            {"domain": dom},
        )
        for dom, path in paths.items()
    ]


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

    def event(
        self, stage: str, seed: int, epoch: int, loss: float, score: float | None, extra=None, *, by_loss=False
    ) -> EpochEvent:
        """This epoch's progress. ``by_loss``: the stage validates on its negated training loss (it has no
        ranking to validate), so the event reports the lowest loss as ``best`` and no validation score."""
        t = self.throughput
        speed = t.samples / max(t.seconds, 1e-9)
        ev = EpochEvent(
            stage, seed, epoch, self.epochs, loss, score, speed, self.best, self.best_epoch, extra or {}, self.epoch_s
        )
        if by_loss:
            ev.valid_ndcg, ev.best, ev.metric = None, -self.best, "loss"
        return ev

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

    @property
    def dcp(self) -> Path:
        """The DCP state folder (both files, row-sharded) that data-parallel runs save until they end."""
        return self.best.with_name(layout.dcp_name(self.best.name))

    @classmethod
    def of(cls, stage: str, data: Dataset, run_dir: Path, seed: int, name: str, config: dict) -> Outputs:
        folder = layout.seed_dir(run_dir, seed)
        return cls(stage, data, seed, config, folder / name, folder / layout.resume_name(name))

    def save_best(self, tensors: dict[str, torch.Tensor], epoch: int, best: float) -> None:
        ckpt.save(self.best, tensors, self._best_meta(epoch, best))

    def _best_meta(self, epoch: int, best: float) -> dict:
        return base_meta(self.stage, self.data, self.seed, self.config, epoch=epoch, best_score=best, **self.meta)

    def _state_meta(self, sched: Schedule, epoch: int, done: bool) -> dict:
        meta = base_meta(self.stage + "-resume", self.data, self.seed, self.config, **sched.meta(epoch, done))
        return {**meta, **self.meta}

    def load_state(self, sched: Schedule, gen: torch.Generator, expect: dict | None = None) -> dict[str, torch.Tensor]:
        """Read the resume state (checked: stage, dataset, seed, config but the settings a resume may change,
        and ``expect``), restore ``sched`` and ``gen``; the stage restores its own tensors from the result."""
        t, meta = ckpt.load(self.state, **self._checks(expect))
        self._restore(t, meta, sched, gen, self.state)
        return t

    def _checks(self, expect: dict | None) -> dict:
        """What a resume state's header must match (both kinds: safetensors file, DCP manifest)."""
        return {
            "stage": self.stage + "-resume",
            "fingerprint": self.data.fingerprint,
            "expect": {"config": self.config, "seed": self.seed, **(expect or {})},
            "may_differ": {"config": ckpt.RESUME_MAY_DIFFER},
        }

    def _restore(self, t: dict, meta: dict, sched: Schedule, gen: torch.Generator, path: Path) -> None:
        if "rng" not in t:
            raise CheckpointError("resume state has no generator state (tensor 'rng')", path)
        sched.restore(meta)
        gen.set_state(t["rng"].cpu().to(torch.uint8))

    def newest_state(self) -> Path | None:
        """The resume state to continue from: ``state`` or the DCP folder, whichever was saved last (a save of
        one kind removes the other, so both exist only after a kill in between); None when there is none."""
        found = [(dcp.saved_at(self.dcp), self.dcp)] if (self.dcp / dcp.MANIFEST).is_file() else []
        if self.state.is_file():
            found.append((self.state.stat().st_mtime, self.state))
        return max(found)[1] if found else None

    def resume(
        self, sched: Schedule, gen: torch.Generator, world: distributed.World, expect: dict | None = None
    ) -> tuple[dict[str, torch.Tensor] | None, tuple[dict[str, torch.Tensor], int] | None]:
        """Read the newest resume state at this world size (:meth:`load_state`, or a DCP state on every rank
        collectively): ``(tensors, best)``, ``(None, None)`` when there is none. ``best``: the best checkpoint
        as ``(tables, epoch)`` when the stage must carry it on (a DCP state holds it, and every save of a
        data-parallel run writes it), else None."""
        source = self.newest_state()
        if source is None:
            return None, None
        if source == self.dcp:
            t, meta, best, best_meta = dcp.load(self.dcp, world, gen.device, **self._checks(expect))
            self._restore(t, meta, sched, gen, self.dcp)
            return t, (dict(best), best_meta["epoch"]) if best is not None else None
        t = self.load_state(sched, gen, expect)
        if world.size == 1 or sched.best_epoch == 0 or not self.best.is_file():
            return t, None
        b, meta = ckpt.load(self.best, stage=self.stage, fingerprint=self.data.fingerprint)
        if meta.get("epoch") != sched.best_epoch:  # not the best the state records: the next improvement is
            return t, None
        return t, ({k: v.to(gen.device) for k, v in b.items()}, sched.best_epoch)

    def save(
        self,
        sched: Schedule,
        epoch: int,
        done: bool,
        tensors: dict[str, torch.Tensor],
        gen: torch.Generator,
        best: tuple[dict[str, torch.Tensor], int] | None,
        world: distributed.World = distributed.SINGLE,
    ):
        """Save after ``epoch``: the best checkpoint ``best`` (tables, epoch) if given, and the resume state.

        One process, and a data-parallel run's last save: the safetensors pair (rank 0), and a DCP state
        this supersedes is removed. A data-parallel run before its end: one DCP state that holds both,
        written by every rank. Returns what the stage keeps as ``best``: None once written, but a
        data-parallel run keeps it, since every DCP state carries it."""
        if world.size > 1 and not done:
            best_meta = None if best is None else self._best_meta(best[1], sched.best)
            state = {**tensors, "rng": gen.get_state()}
            dcp.save(self.dcp, world, state, self._state_meta(sched, epoch, done), best and best[0], best_meta)
            return best
        if world.main:
            if best is not None:
                self.save_best(*best, sched.best)
            self.save_state(sched, epoch, done, tensors, gen)
            if self.dcp.exists():
                dcp.remove(self.dcp)
        return best if world.size > 1 else None

    def save_state(
        self, sched: Schedule, epoch: int, done: bool, tensors: dict[str, torch.Tensor], gen: torch.Generator
    ) -> None:
        """Write the resume state after ``epoch``: the stage's tensors, the generator and the schedule."""
        ckpt.save(self.state, {**tensors, "rng": gen.get_state()}, self._state_meta(sched, epoch, done))


def restore(tensors: dict[str, torch.Tensor], into: dict[str, torch.Tensor], path: Path) -> None:
    """Copy the named resume tensors into the live ones (same shapes), naming a missing one."""
    with torch.no_grad():
        for name, live in into.items():
            if name not in tensors:
                raise CheckpointError(f"resume state has no tensor '{name}'", path)
            if tensors[name].shape != live.shape:
                raise CheckpointError(f"resume tensor '{name}' has shape {list(tensors[name].shape)}", path)
            live.copy_(tensors[name])
