"""What every training stage shares: device, seeding, progress events, validation, the epoch/resume skeleton."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uclr_cli.data.dataset import Dataset, EvalSplit
from uclr_cli.errors import ConfigError, DataError, TrainingError
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
    samples_per_s: float
    best: float
    best_epoch: int
    extra: dict = field(default_factory=dict)


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
    g.manual_seed(seed * 1_000_003 + stream)
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


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
