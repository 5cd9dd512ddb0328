"""The memory a training config needs, estimated before any work, against what the machine has.

``--dim 100000000`` or ``hidden = [1000000000]`` would otherwise fail deep in
the allocator after minutes of setup. :func:`check` refuses such a config in
one line saying how much it needs and how much there is. The estimate counts
only the large tensors (embedding tables, autoencoder weights, their gradients,
optimizer moments, the best copy and the bytes of a checkpoint being written),
so it is a lower bound: a config it refuses cannot run; one it accepts may
still be too large by a small factor (the CLI then reports the allocator's
failure in one line too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from uclr_cli import checkpoint as ckpt
from uclr_cli import config as cfgmod
from uclr_cli import layout
from uclr_cli.errors import CheckpointError, ConfigError

FLOAT = 4  # bytes of a float32

#: Copies of the embedding tables a pretrain run holds at once, by optimizer: the tables, the optimizer's
#: moments (and gradients for dense Adam), the best epoch's copy, and the checkpoint's bytes while it is written.
PRETRAIN_COPIES = {"rowwise-rmsprop": 4, "rowwise-adam": 5, "adam": 6}


@dataclass
class Need:
    """What a config needs: total bytes, the option that drives it, and a short description."""

    bytes: int
    key: str
    what: str


def ae_params(dim: int, hidden: list[int]) -> int:
    """Weights and biases of the autoencoder dim -> hidden... -> mirrored -> dim."""
    sizes = [dim, *hidden]
    enc = sum(a * b + b for a, b in zip(sizes, sizes[1:]))
    dec = sum(b * a + a for a, b in zip(sizes, sizes[1:]))
    return enc + dec


def _dim_from(run_dir: Path | None, seeds: list[int]) -> int | None:
    """The PGE dimension recorded in a seed's pretrain checkpoint header (None when there is none to read)."""
    if run_dir is None:
        return None
    for s in seeds:
        path = layout.seed_dir(run_dir, s) / layout.PRETRAIN
        try:
            dim = ckpt.read_header(path).get("dim") if path.is_file() else None
        except (CheckpointError, OSError):
            continue  # the stage names what is wrong with it
        if isinstance(dim, int) and dim > 0:
            return dim
    return None


def estimate(cfg: cfgmod.StageConfig, data, run_dir: Path | None = None, dim: int | None = None) -> Need | None:
    """The memory ``cfg`` needs on ``data`` (None when it cannot be told, e.g. no pretrain checkpoint yet)."""
    users, items = data.n_users, data.n_items
    if isinstance(cfg, cfgmod.PretrainConfig):
        tables = (users + items) * cfg.dim * FLOAT
        return Need(tables * PRETRAIN_COPIES[cfg.optimizer], "dim", f"dim {cfg.dim}")
    if isinstance(cfg, cfgmod.ContrastConfig):
        dim = dim or _dim_from(run_dir, cfg.seeds)
        if dim is None:
            return None
        weights = ae_params(dim, cfg.hidden) * FLOAT * 6  # weights, gradients, Adam's two moments, best, saving
        batch = min(cfg.batch_size, users)
        acts = batch * (2 * sum(cfg.hidden) + 2 * dim) * 2 * 3 * FLOAT  # two streams, forward and backward
        tables = (users + items) * dim * FLOAT * 2
        return Need(weights + acts + tables, "hidden", f"hidden {cfg.hidden} on dim {dim}")
    if isinstance(cfg, cfgmod.FinetuneConfig):
        dim = dim or _dim_from(run_dir, cfg.seeds)
        if dim is None:
            return None
        lora = (users + dim) * cfg.rank * FLOAT * 6
        tables = (users + items) * dim * FLOAT * 3
        return Need(lora + tables, "rank", f"rank {cfg.rank} on dim {dim}")
    if isinstance(cfg, cfgmod.CatArtConfig):  # ART: every domain's user table, trained with dense Adam
        widest = max(data.item_offsets[d + 1] - data.item_offsets[d] for d in range(len(data.domains)))
        tables = (len(data.domains) * users + widest) * cfg.dim * FLOAT * 6
        return Need(tables, "dim", f"dim {cfg.dim} over {len(data.domains)} domains")
    if isinstance(cfg, cfgmod.GaMtcdrConfig):  # per target: theta (U, N, K), two towers of ~84 K^2, dense Adam
        n, k = len(data.domains), cfg.dim
        per_target = (users * n * k + 2 * 84 * k * k) * 4 + users * n * k * 2  # + the user tables in its checkpoint
        walk_pairs = 16384 * cfg.walk_length * (cfg.window + 1) * 2 * 8 * 2  # a chunk of walks' pairs, shuffled
        tables = ((users + items) * k * 2 + n * per_target) * FLOAT + walk_pairs
        return Need(tables, "dim", f"dim {k} over {n} domains")
    if isinstance(cfg, cfgmod.HeroGraphConfig):  # the tables with row-wise Adam's moments, the targets' scorers
        n, k = len(data.domains), cfg.dim
        tables = (n * users + items + users + items) * k * 3
        scorers = (n * users + items) * 2 * k * 2  # the best tables and the ones just validated
        return Need((tables + scorers) * FLOAT, "dim", f"dim {k} over {n} domains")
    if isinstance(cfg, cfgmod.BaselineConfig):
        widest = max(data.item_offsets[d + 1] - data.item_offsets[d] for d in range(len(data.domains)))
        towers = 2 if cfg.model == "neumf" else 1
        tables = (users + widest) * cfg.dim * FLOAT * towers * 6
        mlp = 0
        if cfg.model == "neumf":
            sizes = [2 * cfg.dim, *cfg.mlp_layers, 1]
            mlp = sum(a * b + b for a, b in zip(sizes, sizes[1:])) * FLOAT * 6
        key = "mlp_layers" if mlp > tables else "dim"
        return Need(tables + mlp, key, f"dim {cfg.dim}" + (f", mlp_layers {cfg.mlp_layers}" if mlp else ""))
    return None


def available(device: str) -> int | None:
    """Bytes the device can still give: free GPU memory, or the host's available memory (cgroup limit included)."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        try:
            return int(torch.cuda.mem_get_info()[0])
        except (RuntimeError, AssertionError):
            return None
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    try:  # a container's limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit.isdigit() and used.isdigit():
            found.append(max(int(limit) - int(used), 0))
    except OSError:
        pass
    return min(found) if found else None


def human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


def check(cfg: cfgmod.StageConfig, data, run_dir: Path | None = None, where_for=None, dim: int | None = None) -> None:
    """Refuse ``cfg`` in one line when it needs more memory than the device has (before any work)."""
    need = estimate(cfg, data, run_dir, dim)
    if need is None:
        return
    have = available(getattr(cfg, "device", "auto"))
    if have is None or need.bytes <= have:
        return
    where = where_for(need.key) if where_for else f"--{need.key.replace('_', '-')}"
    stage = type(cfg).__name__.removesuffix("Config").lower()
    raise ConfigError(
        f"{stage} with {need.what} needs at least {human(need.bytes)} of memory, "
        f"this machine has {human(have)} available",
        where,
    )


def is_out_of_memory(e: BaseException) -> bool:
    """An allocator failure: Python's MemoryError, torch's OutOfMemoryError, or its CPU allocator's RuntimeError."""
    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)
