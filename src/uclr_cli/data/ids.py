"""Raw ids of a prepared folder: ``users.parquet`` (user_idx, user_id), ``items.parquet`` (item_idx, item_id, domain).

The loader (:mod:`uclr_cli.data.dataset`) keeps only indices; what turns them
back into the ids of the raw logs, and raw ids into indices, lives here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from uclr_cli.data.dataset import Dataset
from uclr_cli.errors import DataError


def _read(data: Dataset, table: str, cols: list[str]) -> pl.DataFrame:
    p = Path(data.path) / f"{table}.parquet"
    try:
        df = pl.read_parquet(p, columns=cols)
    except Exception as e:  # polars raises several types for a bad file
        raise DataError(f"unreadable parquet: {type(e).__name__}", p) from None
    return df.sort(cols[0])


def user_ids(data: Dataset) -> np.ndarray:
    """(U,) raw user id (str) of every user index."""
    df = _read(data, "users", ["user_idx", "user_id"])
    return df.get_column("user_id").cast(pl.String).to_numpy().astype(str)


def item_ids(data: Dataset) -> np.ndarray:
    """(I,) raw item id (str) of every global item index (ids repeat across domains; the index does not)."""
    df = _read(data, "items", ["item_idx", "item_id"])
    return df.get_column("item_id").cast(pl.String).to_numpy().astype(str)


def lookup(ids: np.ndarray, wanted: list[str]) -> tuple[np.ndarray, list[str]]:
    """Indices of the ``wanted`` raw ids that exist (in their order) and the unknown ones (in theirs).

    Vectorised: one sort of ``ids`` and a binary search, no loop over users.
    """
    want = np.asarray(wanted, dtype=str)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    pos = np.searchsorted(sorted_ids, want)
    pos_c = np.minimum(pos, len(ids) - 1) if len(ids) else pos
    found = (pos < len(ids)) & (sorted_ids[pos_c] == want) if len(ids) else np.zeros(len(want), dtype=bool)
    return order[pos_c[found]].astype(np.int64), want[~found].tolist()


def read_id_file(path: Path, column: str | None = None) -> list[str]:
    """Raw ids from ``path``: a parquet or CSV/TSV column, or else one id a line (blank lines skipped).

    The column is ``column``, else ``user_id``, ``user`` or the file's only column.
    Every id is read as text, so ``007`` stays ``007``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("users file not found", path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            df = pl.read_parquet(path)
        elif suffix in (".csv", ".tsv"):
            df = pl.read_csv(path, separator="\t" if suffix == ".tsv" else ",", infer_schema=False)
        else:
            text = path.read_text(encoding="utf-8")
            return [line.strip() for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read users file: {getattr(e, 'strerror', None) or type(e).__name__}", path) from None
    except Exception as e:  # polars raises several types for a bad file
        if isinstance(e, DataError):
            raise
        raise DataError(f"unreadable users file: {type(e).__name__}", path) from None
    if column is None:
        column = next((c for c in ("user_id", "user") if c in df.columns), df.columns[0] if df.width == 1 else None)
        if column is None:
            raise DataError(f"pick the id column with --column (columns: {', '.join(df.columns)[:80]})", path)
    if column not in df.columns:
        raise DataError(f"no column {column!r} (columns: {', '.join(df.columns)[:80]})", path)
    ids = df.get_column(column).drop_nulls().cast(pl.String).str.strip_chars()
    return [s for s in ids.to_list() if s]
