"""Writing a prepared folder atomically, and loading it back into tensors.

Layout (docs/design.md §2): ``manifest.json``, ``users.parquet``, ``items.parquet``,
``train.parquet``, ``valid.parquet``, ``test.parquet``. Nothing in it is an
absolute path, so a folder copied elsewhere still loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from uclr_cli import __version__
from uclr_cli.data.split import PreparedTables, domain_stats
from uclr_cli.data.verify import TABLES, check_fingerprint, check_manifest, check_tables, fingerprint_of
from uclr_cli.errors import DataError, os_reason
from uclr_cli.layout import check_domain_name

#: 2: the fingerprint covers the manifest's content (format 1 folders, fingerprinted over the files only, still load).
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"


def check_names(name, domains, where) -> None:
    """Refuse a dataset name that is not one plain folder name, or a domain name that is not file-name safe."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise DataError(f"bad dataset name {str(name)[:40]!r} (must be a plain folder name)", where)
    for d in domains:
        check_domain_name(d, where)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _recover(out: Path) -> None:
    """Clean up after a writer of ``out`` that was killed: drop its temporary folder, and put
    back the previous folder if the kill came between the two renames of :func:`_commit_dir`."""
    from uclr_cli.lock import pid_alive

    pat = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)$")
    try:
        siblings = sorted(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return
    for p in siblings:
        m = pat.match(p.name)
        if not m or not p.is_dir() or pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists() and (p / MANIFEST).is_file():
            p.rename(out)
        else:
            shutil.rmtree(p, ignore_errors=True)


def check_out(out: Path) -> None:
    """``out`` may be replaced: absent, empty, or an earlier prepared folder (never another folder)."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise DataError("output must name a folder (not '.', '..' or '/')", out)
    _recover(out)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise DataError("output exists and is not a folder; refusing to replace it", out)
    try:
        empty = next(out.iterdir(), None) is None
    except OSError as e:
        raise DataError(f"cannot list output folder: {os_reason(e)}", out) from None
    if not empty and not (out / MANIFEST).is_file():
        raise DataError(
            "output folder exists and is not a prepared folder; refusing to replace it (pick another --out)", out
        )


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
    existing ``out`` is left untouched; a failed write (disk full, permissions)
    is one :class:`DataError` naming the file.
    """
    check_names(name, tables.domains, out)
    check_out(out)
    try:
        tmp = _atomic_dir(out)
    except OSError as e:
        raise DataError(f"cannot create output folder: {os_reason(e)}", getattr(e, "filename", None) or out) from None
    current = out  # the file being written, for the error message
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
            current = out / p.name
            frames[key].write_parquet(p, compression="zstd", statistics=False)
            hashes[key] = sha256_file(p)
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "source": source,
            "sources": sources,
            "options": options,
            "created_by": f"uclr-cli {__version__}",
            "files": hashes,
            "n_users": tables.users.height,
            "n_items": tables.items.height,
            "domains": [
                {
                    "name": n,
                    "item_offset": tables.item_offsets[d],
                    "n_items": tables.item_offsets[d + 1] - tables.item_offsets[d],
                }
                for d, n in enumerate(tables.domains)
            ],
            "stats": domain_stats(tables),
        }
        manifest["fingerprint"] = fingerprint_of(manifest)
        check_tables(manifest, frames, out)  # never write a folder that loading would refuse
        current = out / MANIFEST
        with open(tmp / MANIFEST, "w") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        current = out
        _fsync_dir_files(tmp)
        _commit_dir(tmp, out)
    except (OSError, pl.exceptions.PolarsError) as e:  # disk full, permissions: `out` is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"cannot write prepared folder: {os_reason(e)}", current) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _fsync_dir_files(folder: Path) -> None:
    """Flush every file of ``folder`` to disk before the folder is renamed into place."""
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


@dataclass
class EvalSplit:
    """Fixed candidates of one split and domain: row r ranks pos[r] against negs[r]."""

    users: torch.Tensor  # (R,) int64
    pos: torch.Tensor  # (R,) int64 global item index
    negs: torch.Tensor  # (R, N) int64

    def to(self, device) -> EvalSplit:
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
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"unreadable manifest: {str(e)[:80]}", mf) from None
    if not isinstance(manifest, dict) or manifest.get("format_version") not in READABLE_FORMATS:
        raise DataError(f"unsupported prepared format (expected format_version {FORMAT_VERSION})", mf)
    return manifest


def load_prepared(path: Path, *, verify: bool = True) -> Dataset:
    """Read a prepared folder, check it against its manifest and fingerprint, and return tensors.

    Always: the manifest's structure and names, its fingerprint recomputed from
    its content, and every table against it (:mod:`uclr_cli.data.verify`).
    ``verify`` (the default) also re-hashes each parquet file against the
    manifest's sha256 (an edited table); it costs a small share of the load.
    """
    path = Path(path)
    manifest = read_manifest(path)
    mf = path / MANIFEST
    domains, offsets, n_users, n_items, _ = check_manifest(manifest, mf)
    check_names(manifest.get("name"), domains, mf)
    check_fingerprint(manifest, mf)
    frames = {}
    for key in TABLES:
        p = path / f"{key}.parquet"
        if not p.is_file():
            raise DataError(f"missing {key}.parquet", path)
        try:
            digest = sha256_file(p) if verify else None
        except OSError as e:
            raise DataError(f"cannot read file: {os_reason(e)}", p) from None
        if verify and digest != manifest["files"][key]:
            raise DataError("file does not match the manifest's checksum (modified or corrupt)", p)
        try:
            frames[key] = pl.read_parquet(p)
        except Exception as e:  # polars raises several types for a bad file
            raise DataError(f"unreadable parquet: {type(e).__name__}", p) from None
    cols = check_tables(manifest, frames, path)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

    t_user, t_item, t_dom = (tensor(cols["train", c]) for c in ("user", "item", "domain"))
    counts = torch.zeros(len(domains) * n_users, dtype=torch.int64)
    counts.scatter_add_(0, t_dom * n_users + t_user, torch.ones_like(t_user))
    evals = {}
    for split in ("valid", "test"):
        dom = cols[split, "domain"]
        per = {}
        for d, name in enumerate(domains):
            sel = dom == d
            per[name] = EvalSplit(
                tensor(cols[split, "user"][sel]),
                tensor(cols[split, "item"][sel]),
                tensor(cols[split, "negatives"][sel]),
            )
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
