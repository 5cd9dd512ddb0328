"""Writing a prepared folder atomically, and loading it back into tensors.

Layout (DESIGN §2): ``manifest.json``, ``users.parquet``, ``items.parquet``,
``train.parquet``, ``valid.parquet``, ``test.parquet``. Nothing in it is an
absolute path, so a folder copied elsewhere still loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from uclr_cli import __version__
from uclr_cli.data.split import PreparedTables, domain_stats
from uclr_cli.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TABLES = ("users", "items", "train", "valid", "test")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_dir(out: Path):
    """Temporary sibling folder for ``out``; renamed into place by :func:`_commit_dir`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _commit_dir(tmp: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def write_prepared(
    tables: PreparedTables,
    out: Path,
    *,
    name: str,
    source: str,
    sources: list[dict],
    options: dict,
) -> dict:
    """Write the prepared folder to a temporary sibling and rename it into place.

    Returns the manifest. On any failure the temporary folder is removed and an
    existing ``out`` is left untouched.
    """
    tmp = _atomic_dir(out)
    try:
        frames = {
            "users": tables.users,
            "items": tables.items,
            "train": tables.train,
            "valid": tables.valid,
            "test": tables.test,
        }
        hashes = {}
        for key in TABLES:
            p = tmp / f"{key}.parquet"
            frames[key].write_parquet(p, compression="zstd", statistics=False)
            hashes[key] = sha256_file(p)
        fingerprint = hashlib.sha256("".join(hashes[k] for k in TABLES).encode()).hexdigest()
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "source": source,
            "sources": sources,
            "options": options,
            "created_by": f"uclr-cli {__version__}",
            "fingerprint": fingerprint,
            "files": hashes,
            "n_users": tables.users.height,
            "n_items": tables.items.height,
            "domains": [
                {"name": n, "item_offset": tables.item_offsets[d], "n_items": tables.item_offsets[d + 1] - tables.item_offsets[d]}
                for d, n in enumerate(tables.domains)
            ],
            "stats": domain_stats(tables),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


@dataclass
class EvalSplit:
    """Fixed candidates of one split and domain: row r ranks pos[r] against negs[r]."""

    users: torch.Tensor  # (R,) int64
    pos: torch.Tensor  # (R,) int64 global item index
    negs: torch.Tensor  # (R, N) int64

    def to(self, device) -> "EvalSplit":
        return EvalSplit(self.users.to(device), self.pos.to(device), self.negs.to(device))


@dataclass
class Dataset:
    """A prepared folder in tensors, on the CPU (stages move what they need)."""

    path: Path
    manifest: dict
    n_users: int
    n_items: int
    domains: list[str]
    item_offsets: list[int]  # len D+1
    train_user: torch.Tensor  # (T,) int64, sorted by (domain, user, time)
    train_item: torch.Tensor  # (T,) int64
    train_domain: torch.Tensor  # (T,) int64
    train_counts: torch.Tensor  # (D, U) train interactions per user and domain
    valid: dict[str, EvalSplit]
    test: dict[str, EvalSplit]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def domain_index(self, name: str) -> int:
        try:
            return self.domains.index(name)
        except ValueError:
            raise DataError(f"unknown domain '{name}'; available: {', '.join(self.domains)}", "--domain") from None

    def split(self, which: str) -> dict[str, EvalSplit]:
        return self.valid if which == "valid" else self.test


def read_manifest(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise DataError("prepared folder not found", path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise DataError("not a prepared folder: manifest.json is missing (run `uclr prepare` first)", path)
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"unreadable manifest: {e}", mf) from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"unsupported prepared format (expected format_version {FORMAT_VERSION})", mf)
    return manifest


def load_prepared(path: Path, *, verify: bool = True) -> Dataset:
    """Read a prepared folder, check it against its manifest, and return tensors."""
    path = Path(path)
    manifest = read_manifest(path)
    frames = {}
    for key in TABLES:
        p = path / f"{key}.parquet"
        if not p.is_file():
            raise DataError(f"missing {key}.parquet", path)
        if verify and sha256_file(p) != manifest.get("files", {}).get(key):
            raise DataError("file does not match the manifest's checksum (modified or corrupt)", p)
        try:
            frames[key] = pl.read_parquet(p)
        except Exception as e:  # polars raises several types for a bad file
            raise DataError(f"unreadable parquet: {type(e).__name__}", p) from None
    domains = [d["name"] for d in manifest["domains"]]
    offsets = [d["item_offset"] for d in manifest["domains"]] + [manifest["n_items"]]
    n_users, n_items = manifest["n_users"], manifest["n_items"]
    if frames["users"].height != n_users or frames["items"].height != n_items:
        raise DataError("users/items tables do not match the manifest counts", path / MANIFEST)

    def col(df: pl.DataFrame, c: str) -> torch.Tensor:
        return torch.from_numpy(df.get_column(c).to_numpy().astype(np.int64))

    train = frames["train"]
    t_user, t_item, t_dom = col(train, "user"), col(train, "item"), col(train, "domain")
    counts = torch.zeros(len(domains) * n_users, dtype=torch.int64)
    counts.scatter_add_(0, t_dom * n_users + t_user, torch.ones_like(t_user))
    evals = {}
    for split in ("valid", "test"):
        df = frames[split]
        per = {}
        for d, name in enumerate(domains):
            sub = df.filter(pl.col("domain") == d)
            n_neg = manifest["options"]["negatives"]
            neg_np = sub.get_column("negatives").explode().to_numpy().astype(np.int64).reshape(sub.height, n_neg)
            per[name] = EvalSplit(col(sub, "user"), col(sub, "item"), torch.from_numpy(neg_np))
        evals[split] = per
    return Dataset(
        path=path,
        manifest=manifest,
        n_users=n_users,
        n_items=n_items,
        domains=domains,
        item_offsets=offsets,
        train_user=t_user,
        train_item=t_item,
        train_domain=t_dom,
        train_counts=counts.view(len(domains), n_users),
        valid=evals["valid"],
        test=evals["test"],
    )
