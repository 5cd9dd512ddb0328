"""Checks of a prepared folder: the manifest against its fingerprint, the tables against the manifest.

Run on every load (and by ``prepare`` before it writes), so a hand-edited or
damaged folder is refused in one line instead of training on wrong data:

* **fingerprint** (format 2): sha256 over the manifest's content itself (every
  key but ``fingerprint`` and ``created_by``), which includes each parquet
  file's sha256. An edited manifest no longer matches its fingerprint; one
  re-sealed with a new fingerprint is another dataset, which every checkpoint
  then refuses.
* **manifest structure**: names, a non-empty list of distinct domains whose
  item ranges are contiguous from 0 and cover ``n_items``, each with more
  than ``negatives`` items, ``negatives`` in [1, 10000].
* **tables**: columns and integer types, no nulls; users and items numbered
  0..n-1 and items in their domain's range; every id in range and every train
  item, positive and candidate in the row's domain; ``negatives`` candidates
  per row, distinct and never the positive, none an item the user touched in
  any split; one valid and one test row per user and domain at most, their
  positives not in train (nor valid = test); no duplicate train pair; a test
  row in every domain; per-domain counts equal to the manifest's stats.

All checks are vectorised (NumPy over whole columns).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl

from uclr_cli.errors import DataError

TABLES = ("users", "items", "train", "valid", "test")
#: Manifest keys the fingerprint leaves out: itself, and the writer's version (same data, same identity).
UNHASHED = ("fingerprint", "created_by")
MAX_NEGATIVES = 10_000

#: Integer columns each table must have (plus ``negatives``, a list of integers, in valid/test).
COLUMNS = {
    "users": ("user_idx",),
    "items": ("item_idx",),
    "train": ("user", "item", "domain"),
    "valid": ("user", "domain", "item"),
    "test": ("user", "domain", "item"),
}


def fingerprint_of(manifest: dict) -> str:
    """The fingerprint a manifest should carry (format 1: over the five file hashes only)."""
    if manifest.get("format_version") == 1:
        files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
        return hashlib.sha256("".join(str(files.get(k)) for k in TABLES).encode()).hexdigest()
    body = {k: v for k, v in manifest.items() if k not in UNHASHED}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _int(value, what: str, where, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"manifest entry {what} must be an integer, found {str(value)[:30]!r}", where)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise DataError(f"manifest entry {what} must be {rng}, found {value}", where)
    return value


def check_manifest(manifest: dict, where) -> tuple[list[str], list[int], int, int, int]:
    """(domains, offsets incl. n_items, n_users, n_items, negatives) of a structurally sound manifest."""
    domains = manifest.get("domains")
    if not isinstance(domains, list) or not domains:
        raise DataError("manifest lists no domains", where)
    if not all(isinstance(d, dict) for d in domains):
        raise DataError("manifest entry domains must be a list of objects", where)
    names = [d.get("name") for d in domains]
    for n in names:
        if not isinstance(n, str):
            raise DataError(f"manifest has a domain without a name ({str(n)[:30]!r})", where)
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise DataError(f"manifest lists domain '{dup}' twice", where)
    n_users = _int(manifest.get("n_users"), "n_users", where, 1)
    n_items = _int(manifest.get("n_items"), "n_items", where, 1)
    options = manifest.get("options")
    if not isinstance(options, dict):
        raise DataError("manifest lacks its options", where)
    n_neg = _int(options.get("negatives"), "options.negatives", where, 1, MAX_NEGATIVES)
    offsets = [0]
    for d in domains:
        off = _int(d.get("item_offset"), f"item_offset of '{d['name']}'", where, 0)
        size = _int(d.get("n_items"), f"n_items of '{d['name']}'", where, 1)
        if off != offsets[-1]:
            raise DataError(
                f"item_offset of '{d['name']}' is {off}, expected {offsets[-1]} (domains own contiguous ranges)", where
            )
        if size < n_neg + 1:
            raise DataError(f"domain '{d['name']}' has {size} items, fewer than negatives+1 = {n_neg + 1}", where)
        offsets.append(off + size)
    if offsets[-1] != n_items:
        raise DataError(f"domain item ranges end at {offsets[-1]}, but n_items is {n_items}", where)
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(files.get(k), str) for k in TABLES):
        raise DataError("manifest lacks the files' checksums", where)
    return names, offsets, n_users, n_items, n_neg


def check_fingerprint(manifest: dict, where) -> str:
    try:
        want = fingerprint_of(manifest)
    except (TypeError, ValueError) as e:  # e.g. NaN written into the manifest
        raise DataError(f"manifest cannot be fingerprinted ({str(e)[:60]})", where) from None
    if manifest.get("fingerprint") != want:
        raise DataError(
            "manifest does not match its fingerprint (edited after `uclr prepare`?); prepare the folder again", where
        )
    return want


def _column(df: pl.DataFrame, table: str, col: str, where) -> np.ndarray:
    if col not in df.columns:
        raise DataError(f"missing column '{col}'", _file(where, table))
    s = df.get_column(col)
    if not s.dtype.is_integer():
        raise DataError(f"column '{col}' is {s.dtype}, not integers", _file(where, table))
    if s.null_count():
        raise DataError(f"column '{col}' has empty values", _file(where, table))
    return s.to_numpy().astype(np.int64, copy=False)


def _bad_row(mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[0]) + 1 if len(idx) else None


def _fail_if(mask: np.ndarray, message: str, table: str, folder) -> None:
    """Refuse the first row where ``mask`` holds, naming the file and the row (1-based)."""
    row = _bad_row(mask)
    if row is not None:
        raise DataError(message, _file(folder, table), line=row)


def _file(folder, table: str):
    return Path(folder) / f"{table}.parquet"


def _negatives(df: pl.DataFrame, table: str, n_neg: int, where) -> np.ndarray:
    if "negatives" not in df.columns:
        raise DataError("missing column 'negatives'", _file(where, table))
    s = df.get_column("negatives")
    if isinstance(s.dtype, pl.Array):
        s = s.cast(pl.List(s.dtype.inner))
    if not isinstance(s.dtype, pl.List) or not s.dtype.inner.is_integer():
        raise DataError(f"column 'negatives' is {s.dtype}, not lists of integers", _file(where, table))
    if s.null_count():
        raise DataError("column 'negatives' has empty values", _file(where, table))
    lens = s.list.len().to_numpy()
    _fail_if(lens != n_neg, f"a row has other than {n_neg} negatives (the manifest's count)", table, where)
    flat = s.explode()
    if flat.null_count():
        raise DataError("column 'negatives' has empty values", _file(where, table))
    return flat.to_numpy().astype(np.int64, copy=False).reshape(df.height, n_neg)


def _member(keys: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``keys`` (any shape) found in ``table``: a hashed look-up in Polars, several times faster than np.isin here."""
    if not len(table) or not keys.size:
        return np.zeros(keys.shape, dtype=bool)
    found = pl.Series(keys.ravel()).is_in(pl.Series(table).implode())
    return found.to_numpy().reshape(keys.shape)


def check_tables(manifest: dict, frames: dict[str, pl.DataFrame], where) -> dict:
    """Every table against the manifest; returns the checked int64 columns (see :data:`COLUMNS`)."""
    mf = Path(where) / "manifest.json"
    names, offsets, n_users, n_items, n_neg = check_manifest(manifest, mf)
    n_dom = len(names)
    off = np.asarray(offsets, dtype=np.int64)
    out: dict = {}
    for table, cols in COLUMNS.items():
        for c in cols:
            out[table, c] = _column(frames[table], table, c, where)
    if frames["users"].height != n_users or frames["items"].height != n_items:
        raise DataError("users/items tables do not match the manifest counts", mf)
    _fail_if(out["users", "user_idx"] != np.arange(n_users), "users are not numbered 0..n-1 in order", "users", where)
    _fail_if(out["items", "item_idx"] != np.arange(n_items), "items are not numbered 0..n-1 in order", "items", where)
    if "domain" in frames["items"].columns:
        item_dom = frames["items"].get_column("domain")
        want = np.repeat(np.asarray(names, dtype=object), np.diff(off))
        if item_dom.dtype != pl.String or item_dom.null_count():
            raise DataError("column 'domain' is not domain names", _file(where, "items"))
        _fail_if(item_dom.to_numpy() != want, "an item lies outside its domain's range", "items", where)

    def ids(table: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u, i, d = out[table, "user"], out[table, "item"], out[table, "domain"]
        _fail_if((d < 0) | (d >= n_dom), f"domain index outside [0, {n_dom})", table, where)
        _fail_if((u < 0) | (u >= n_users), f"user index outside [0, {n_users})", table, where)
        _fail_if((i < off[d]) | (i >= off[d + 1]), "item outside its domain's item range", table, where)
        return u, i, d

    tu, ti, td = ids("train")
    train_keys = tu * n_items + ti
    sorted_train = np.sort(train_keys)
    if len(sorted_train) > 1 and (dup := np.flatnonzero(sorted_train[1:] == sorted_train[:-1])).size:
        key = int(sorted_train[dup[0]])
        raise DataError(f"user {key // n_items} has item {key % n_items} twice", _file(where, "train"))
    evals = {}
    for table in ("valid", "test"):
        u, i, d = ids(table)
        negs = _negatives(frames[table], table, n_neg, where)
        lo, hi = off[d][:, None], off[d + 1][:, None]
        _fail_if(((negs < lo) | (negs >= hi)).any(axis=1), "a negative lies outside the row's domain", table, where)
        cand = np.sort(np.concatenate([i[:, None], negs], axis=1), axis=1)
        _fail_if((cand[:, 1:] == cand[:, :-1]).any(axis=1), "a row repeats a candidate", table, where)
        row_keys = d * n_users + u
        s = np.sort(row_keys)
        if len(s) > 1 and (s[1:] == s[:-1]).any():
            raise DataError("two rows for one user and domain", _file(where, table))
        pos_keys = u * n_items + i
        _fail_if(_member(pos_keys, sorted_train), "the positive is also a train item of the user", table, where)
        evals[table] = (u, i, d, negs, pos_keys)
    both = evals["valid"][4][_member(evals["valid"][4], evals["test"][4])]
    if both.size:
        key = int(both[0])
        raise DataError(f"user {key // n_items} has item {key % n_items} in valid and test", _file(where, "test"))
    touched = np.concatenate([sorted_train, evals["valid"][4], evals["test"][4]])
    for table in ("valid", "test"):
        u, _, _, negs, _ = evals[table]
        hit = _member(u[:, None] * n_items + negs, touched).any(axis=1)
        _fail_if(hit, "a negative is an item the user interacted with", table, where)
        out[table, "negatives"] = negs
    _check_counts(manifest, names, td, evals, where, mf)
    return out


def _check_counts(manifest: dict, names: list[str], td: np.ndarray, evals: dict, where, mf) -> None:
    n_dom = len(names)
    counts = {
        "train": np.bincount(td, minlength=n_dom),
        "valid": np.bincount(evals["valid"][2], minlength=n_dom),
        "test": np.bincount(evals["test"][2], minlength=n_dom),
    }
    for d, name in enumerate(names):
        if counts["test"][d] == 0:
            raise DataError(f"domain '{name}' has no test row", _file(where, "test"))
    stats = manifest.get("stats")
    if stats is None:
        return
    by_name = {s.get("domain"): s for s in stats if isinstance(s, dict)} if isinstance(stats, list) else {}
    for d, name in enumerate(names):
        st = by_name.get(name)
        if st is None:
            raise DataError(f"manifest stats lack domain '{name}'", mf)
        for split, c in counts.items():
            if st.get(split) != int(c[d]):
                raise DataError(
                    f"{int(c[d])} rows of domain '{name}', the manifest's stats say {st.get(split)}",
                    _file(where, split),
                )
