"""Top-K items of one domain for users given by raw id, under one trained model (``uclr recommend``).

The model is the one asked for, or the best trained model on validation
(:func:`uclr_cli.trained.choose`); every item of the domain is scored for each
user, ``chunk`` users at a time (:func:`uclr_cli.catalogue.topk_items`), so
memory is bounded by the chunk, never users x items. The user's train items of
the domain are left out unless ``include_seen``. A user with no train
interaction in the domain still has a representation (users are shared by the
domains), so they get a full list: that is what cross-domain training is for.

Plain functions: nothing here prints or exits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from uclr_cli import catalogue, loop, trained
from uclr_cli.data import ids
from uclr_cli.data.dataset import Dataset
from uclr_cli.errors import ConfigError, DataError
from uclr_cli.files import atomic_write

#: Output columns: the user's raw id, rank 1..K, the item's raw id, the model's score.
SCHEMA = {"user": pl.String, "rank": pl.Int64, "item": pl.String, "score": pl.Float64}
FORMATS = {".parquet": "parquet", ".csv": "csv"}


@dataclass
class RecommendResult:
    """What :func:`run` returns."""

    choice: trained.Choice
    domain: str
    k: int
    frame: pl.DataFrame  # SCHEMA, users in request order, ranks ascending
    n_users: int  # distinct known users scored
    unknown: list[str] = field(default_factory=list)  # requested raw ids not in the data, in request order
    seconds: float = 0.0


def seen_items(data: Dataset, domain: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of each user's train items in ``domain`` (local indices)."""
    d = data.domain_index(domain)
    lo, hi = data.item_offsets[d], data.item_offsets[d + 1]
    sel = data.train_domain == d
    return tuple(
        t.to(device)
        for t in catalogue.exclusion_csr(data.train_user[sel], data.train_item[sel] - lo, data.n_users, hi - lo)
    )


def output_format(path: Path) -> str:
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ConfigError(f"output must end in {' or '.join(FORMATS)}", str(path))
    return fmt


def run(
    data: Dataset,
    run_dir: Path,
    domain: str,
    users: list[str],
    *,
    k: int = 10,
    model: str | None = None,
    seed: int | None = None,
    include_seen: bool = False,
    device: str = "auto",
    chunk: int | None = None,
) -> RecommendResult:
    """Top-``k`` of ``domain`` for the raw user ids ``users`` (duplicates scored once, unknown ones returned)."""
    data.domain_index(domain)  # an unknown domain is a one-line error naming the choices
    if k < 1:
        raise ConfigError(f"--top must be >= 1; got {k}", "--top")
    if not users:
        raise DataError("no user ids given", "--users")
    t0 = time.perf_counter()
    dev = loop.resolve_device(device)
    wanted = list(dict.fromkeys(users))
    user_ids = ids.user_ids(data)
    idx, unknown = ids.lookup(user_ids, wanted)
    choice = trained.choose(Path(run_dir), data, [domain], dev, model=model, seed=seed)
    if len(idx) == 0:
        return RecommendResult(choice, domain, k, pl.DataFrame(schema=SCHEMA), 0, unknown, time.perf_counter() - t0)
    dm = trained.domain_model(choice.seed_dir, choice.seed, choice.name, data, domain, dev)
    exclude = None if include_seen else seen_items(data, domain, dev)
    u = torch.from_numpy(idx).to(dev)
    top, scores = catalogue.topk_items(dm.score_all(), u, dm.n_items, k, exclude, chunk or dm.chunk(dev))
    top, scores = top.cpu().numpy(), scores.cpu().double().numpy()
    keep = top >= 0  # a user with fewer than k unseen items gets a shorter list
    item_ids = ids.item_ids(data)[dm.item_offset : dm.item_offset + dm.n_items]
    rows = np.nonzero(keep)
    frame = pl.DataFrame(
        {
            "user": user_ids[idx][rows[0]],
            "rank": rows[1].astype(np.int64) + 1,
            "item": item_ids[top[keep]],
            "score": scores[keep],
        },
        schema=SCHEMA,
    )
    return RecommendResult(choice, domain, top.shape[1], frame, len(idx), unknown, time.perf_counter() - t0)


def write(frame: pl.DataFrame, path: Path) -> Path:
    """The recommendations to ``path`` (.parquet or .csv), atomically."""
    path = Path(path)
    fmt = output_format(path)
    if fmt == "parquet":
        atomic_write(path, lambda tmp: frame.write_parquet(tmp, compression="zstd"), "parquet", DataError)
    else:
        atomic_write(path, lambda tmp: frame.write_csv(tmp), "CSV", DataError)
    return path


def write_unknown(unknown: list[str], path: Path) -> Path:
    """The unknown raw ids, one a line, atomically."""
    path = Path(path)
    atomic_write(
        path, lambda tmp: tmp.write_text("".join(f"{u}\n" for u in unknown), encoding="utf-8"), "file", DataError
    )
    return path
