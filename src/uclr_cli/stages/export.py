"""User and item representations of one trained model, exactly as the scorer uses them (``uclr export``).

For each domain: the user table (U, m) and the domain's item table (I_d, m)
whose dot products are the model's scores, ``score(u, i) = users[u] · items[i]``,
higher is better. They come from :func:`uclr_cli.trained.domain_model`, the
loader ``evaluate`` and ``recommend`` score with. NeuMF's scores are an MLP over
both embeddings, not a dot product: it has nothing of this kind and is refused.

Formats (all carry the raw ids and the metadata of :func:`metadata`):

* ``safetensors``: one file; tensors ``users.<domain>``, ``items.<domain>``;
  header metadata ``uclr_export`` (JSON), ``user_ids`` and ``item_ids.<domain>``
  (JSON lists of raw ids, in row order);
* ``parquet``: one file, one row per vector: ``kind`` (user|item), ``domain``,
  ``index`` (uclr's user index or global item index), ``id`` (raw id),
  ``vector`` (Array[Float32, m]); key-value metadata ``uclr_export`` (JSON);
* ``npy``: a folder with ``meta.json`` and, per domain, ``users.<domain>.npy``,
  ``items.<domain>.npy``, ``item_ids.<domain>.npy``, plus ``user_ids.npy``;
  ids are fixed-width unicode arrays, so ``numpy.load(..., allow_pickle=False)`` reads every file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from uclr_cli import __version__, loop, trained
from uclr_cli.data import ids
from uclr_cli.data.dataset import Dataset
from uclr_cli.errors import ConfigError, DataError
from uclr_cli.files import atomic_dir, atomic_write

FORMATS = ("parquet", "safetensors", "npy")
FORMAT_VERSION = 1
META_KEY = "uclr_export"
NPY_META = "meta.json"
CONVENTION = "score(u, i) = users[u] . items[i] (dot product, higher is better); rows follow user_ids and item_ids"
NOT_DOT = "NeuMF is not a dot product (its scores are an MLP over both embeddings): nothing to export"


@dataclass
class ExportResult:
    choice: trained.Choice
    path: Path
    format: str
    domains: list[str]
    dim: int
    n_users: int


def metadata(data: Dataset, choice: trained.Choice, domains: list[str], dim: int) -> dict:
    """What every export records: model, seed, dataset and its fingerprint, the scoring convention."""
    return {
        "format": "uclr-export",
        "format_version": FORMAT_VERSION,
        "created_by": f"uclr-cli {__version__}",
        "model": choice.name,
        "seed": choice.seed,
        "selected": "best mean valid NDCG@10" if choice.picked else "asked for (--model)",
        "dataset": data.name,
        "fingerprint": data.fingerprint,
        "score": "dot",
        "convention": CONVENTION,
        "dim": dim,
        "n_users": data.n_users,
        "domains": [
            {"name": d, "item_offset": data.item_offsets[data.domain_index(d)], "n_items": n}
            for d, n in ((d, _n_items(data, d)) for d in domains)
        ],
    }


def _n_items(data: Dataset, domain: str) -> int:
    i = data.domain_index(domain)
    return data.item_offsets[i + 1] - data.item_offsets[i]


def run(
    data: Dataset,
    run_dir: Path,
    out: Path,
    fmt: str,
    *,
    domains: list[str] | None = None,
    model: str | None = None,
    seed: int | None = None,
    device: str = "auto",
) -> ExportResult:
    """Write the representations of ``model`` (default: the best dot-product model on validation) to ``out``."""
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}", "--format")
    domains = list(data.domains) if domains is None else domains
    for d in domains:
        data.domain_index(d)
    if model == "NeuMF":
        raise ConfigError(NOT_DOT + "; choose another --model", "--model")
    dev = loop.resolve_device(device)
    choice = trained.choose(Path(run_dir), data, domains, dev, model=model, seed=seed, allowed=lambda n: n != "NeuMF")
    tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for d in domains:
        dm = trained.domain_model(choice.seed_dir, choice.seed, choice.name, data, d, dev)
        if not dm.is_dot:  # pragma: no cover - NeuMF is refused above
            raise ConfigError(NOT_DOT, "--model")
        u, it = (t.detach().to("cpu", torch.float32).contiguous().numpy() for t in (dm.users, dm.items))
        tables[d] = (u, it)
    dim = next(iter(tables.values()))[0].shape[1]
    meta = metadata(data, choice, domains, dim)
    user_ids = ids.user_ids(data)
    all_items = ids.item_ids(data)
    item_ids = {}
    for d in domains:
        lo = data.item_offsets[data.domain_index(d)]
        item_ids[d] = all_items[lo : lo + _n_items(data, d)]
    out = Path(out)
    if fmt == "safetensors":
        _write_safetensors(out, tables, meta, user_ids, item_ids)
    elif fmt == "parquet":
        _write_parquet(out, tables, meta, user_ids, item_ids, data)
    else:
        _write_npy(out, tables, meta, user_ids, item_ids)
    return ExportResult(choice, out, fmt, domains, dim, data.n_users)


def _write_safetensors(out: Path, tables, meta, user_ids, item_ids) -> None:
    from safetensors.numpy import save_file

    tensors = {}
    for d, (u, it) in tables.items():
        tensors[f"users.{d}"], tensors[f"items.{d}"] = u, it
    header = {META_KEY: json.dumps(meta), "user_ids": json.dumps(user_ids.tolist())}
    for d, v in item_ids.items():
        header[f"item_ids.{d}"] = json.dumps(v.tolist())
    atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=header), "export", DataError)


def _write_parquet(out: Path, tables, meta, user_ids, item_ids, data: Dataset) -> None:
    parts = []
    for d, (u, it) in tables.items():
        lo = data.item_offsets[data.domain_index(d)]
        for kind, vecs, index, raw in (
            ("user", u, np.arange(len(u), dtype=np.int64), user_ids),
            ("item", it, lo + np.arange(len(it), dtype=np.int64), item_ids[d]),
        ):
            parts.append(
                pl.DataFrame(
                    {
                        "kind": pl.Series([kind] * len(vecs), dtype=pl.String),
                        "domain": pl.Series([d] * len(vecs), dtype=pl.String),
                        "index": index,
                        "id": pl.Series(raw, dtype=pl.String),
                        "vector": pl.Series(vecs, dtype=pl.Array(pl.Float32, vecs.shape[1])),
                    }
                )
            )
    frame = pl.concat(parts)
    atomic_write(
        out,
        lambda tmp: frame.write_parquet(tmp, compression="zstd", metadata={META_KEY: json.dumps(meta)}),
        "export",
        DataError,
    )


def _write_npy(out: Path, tables, meta, user_ids, item_ids) -> None:
    def write(tmp: Path) -> None:
        (tmp / NPY_META).write_text(json.dumps(meta, indent=2) + "\n")
        np.save(tmp / "user_ids.npy", np.asarray(user_ids, dtype=str), allow_pickle=False)
        for d, (u, it) in tables.items():
            np.save(tmp / f"users.{d}.npy", u, allow_pickle=False)
            np.save(tmp / f"items.{d}.npy", it, allow_pickle=False)
            np.save(tmp / f"item_ids.{d}.npy", np.asarray(item_ids[d], dtype=str), allow_pickle=False)

    atomic_dir(out, write, "export folder", marker=NPY_META, error=DataError)
