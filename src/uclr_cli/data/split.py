"""From raw interactions to the prepared tables: filter, index, split, draw candidates.

Everything here is frame or array work (Polars, NumPy); nothing loops over
users or interactions in Python, except the exact fallback for the rare rows
whose user has touched most of a domain's items.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from uclr_cli.data.raw import RawDomain
from uclr_cli.errors import DataError

#: Rows per candidate-sampling chunk.
NEG_CHUNK = 65_536

#: Activity buckets (train interactions per user and domain) used in every report.
DEFAULT_BUCKETS: tuple[int, ...] = (0, 1, 3, 6, 21)


def bucket_labels(edges: tuple[int, ...] = DEFAULT_BUCKETS) -> list[str]:
    """Human labels for bucket lower edges, e.g. (0,1,3,6,21) -> 0, 1-2, 3-5, 6-20, 21+."""
    labels = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] - 1 if i + 1 < len(edges) else None
        if hi is None:
            labels.append(f"{lo}+")
        elif hi == lo:
            labels.append(str(lo))
        else:
            labels.append(f"{lo}-{hi}")
    return labels


def bucket_index(counts: np.ndarray, edges: tuple[int, ...] = DEFAULT_BUCKETS) -> np.ndarray:
    """Bucket of each count: the last edge that is <= count."""
    return np.searchsorted(np.asarray(edges), counts, side="right") - 1


@dataclass
class PreparedTables:
    """The prepared dataset in memory, ready to be written."""

    domains: list[str]
    item_offsets: list[int]  # len D+1; domain d owns global items [off[d], off[d+1])
    users: pl.DataFrame  # user_idx:i32, user_id:str
    items: pl.DataFrame  # item_idx:i32, item_id:str, domain:str
    train: pl.DataFrame  # user:i32, item:i32, domain:i16, ts:i64
    valid: pl.DataFrame  # user:i32, domain:i16, item:i32, negatives:list[i32]
    test: pl.DataFrame
    interactions: np.ndarray | None = None  # (D, U) interactions per user and domain, all splits
    excluded: dict[str, int] = field(default_factory=dict)  # per domain: users left out of valid/test
    dropped_items: dict[str, int] = field(default_factory=dict)


def _combined(raw: list[RawDomain], min_rating: float | None) -> pl.LazyFrame:
    parts = []
    for d, rd in enumerate(raw):
        lf = rd.frame.lazy().select(["user", "item", "rating", "ts", "line"])
        parts.append(lf.with_columns(pl.lit(d, dtype=pl.Int16).alias("domain")))
    lf = pl.concat(parts, how="vertical")
    if min_rating is not None:
        lf = lf.filter(pl.col("rating").is_null() | (pl.col("rating") >= min_rating))
    return lf


def _drop_items(
    lf: pl.LazyFrame, n_domains: int, frac: float, rng: np.random.Generator
) -> tuple[pl.LazyFrame, list[int]]:
    """Remove ``frac`` of each domain's items at random (the paper's Amazon setting)."""
    present = lf.select(["domain", "item"]).unique().collect()
    dropped_counts = []
    drops = []
    for d in range(n_domains):
        items = present.filter(pl.col("domain") == d).get_column("item").sort().to_numpy()
        n_drop = int(round(frac * len(items)))
        chosen = items[rng.permutation(len(items))[:n_drop]] if n_drop else items[:0]
        dropped_counts.append(n_drop)
        drops.append(
            pl.DataFrame(
                {"domain": pl.Series([d] * n_drop, dtype=pl.Int16), "item": pl.Series(chosen, dtype=pl.String)}
            )
        )
    gone = pl.concat(drops)
    return lf.join(gone.lazy(), on=["domain", "item"], how="anti"), dropped_counts


def _first_unique_mask(mat: np.ndarray) -> np.ndarray:
    """True where an entry is the first occurrence of its value in its row."""
    order = np.argsort(mat, axis=1, kind="stable")
    srt = np.take_along_axis(mat, order, axis=1)
    dup_sorted = np.zeros_like(srt, dtype=bool)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    first = np.empty_like(dup_sorted)
    np.put_along_axis(first, order, ~dup_sorted, axis=1)
    return first


def _touched(keys_sorted: np.ndarray, users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    q = users.astype(np.int64)[:, None] * n_items + items
    pos = np.searchsorted(keys_sorted, q)
    pos = np.minimum(pos, len(keys_sorted) - 1)
    return keys_sorted[pos] == q


def sample_negatives(
    users: np.ndarray,
    lo: int,
    hi: int,
    touched_keys: np.ndarray,
    touched_count: np.ndarray,
    n_items: int,
    n_neg: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw ``n_neg`` distinct items in ``[lo, hi)`` per row, none touched by the row's user.

    ``touched_keys`` are sorted ``user * n_items + item`` keys of every (user, item)
    pair of the domain in any split; ``touched_count`` the number per row's user.
    Rows must have at least ``n_neg`` untouched items. Rejection sampling in
    vectorised rounds; rows whose user touched over half the range use an
    exact draw from the complement instead.
    """
    r = len(users)
    out = np.full((r, n_neg), -1, dtype=np.int64)
    size = hi - lo
    dense = touched_count * 2 > size
    sparse_rows = np.flatnonzero(~dense)
    extra = n_neg + 16
    todo = np.arange(len(sparse_rows))
    cur = np.full((len(sparse_rows), n_neg), -1, dtype=np.int64)
    while len(todo):
        u = users[sparse_rows[todo]]
        draw = rng.integers(lo, hi, size=(len(todo), extra), dtype=np.int64)
        mat = np.concatenate([cur[todo], draw], axis=1)
        ok = (mat >= 0) & ~_touched(touched_keys, u, mat, n_items) & _first_unique_mask(mat)
        order = np.argsort(~ok, axis=1, kind="stable")[:, :n_neg]
        picked = np.take_along_axis(mat, order, axis=1)
        good = np.take_along_axis(ok, order, axis=1)
        cur[todo] = np.where(good, picked, -1)
        todo = todo[~good.all(axis=1)]
    out[sparse_rows] = cur
    for i in np.flatnonzero(dense):  # rare: users who touched most of the domain
        pool = np.arange(lo, hi, dtype=np.int64)
        pool = pool[~_touched(touched_keys, np.full(len(pool), users[i]), pool[:, None], n_items)[:, 0]]
        out[i] = pool[rng.permutation(len(pool))[:n_neg]]
    return out


def build_tables(
    raw: list[RawDomain],
    *,
    min_rating: float | None = None,
    drop_items: float = 0.0,
    negatives: int = 99,
    seed: int = 0,
    warn=None,
) -> PreparedTables:
    """Filter, index and split raw interactions; draw fixed candidates (docs/design.md §2)."""
    names = [rd.name for rd in raw]
    where = {rd.name: (rd.path if rd.path is not None else rd.name) for rd in raw}
    n_dom = len(raw)
    rng = np.random.default_rng(seed)

    lf = _combined(raw, min_rating).drop("rating")
    counts = lf.group_by("domain").len().collect()
    for d, name in enumerate(names):
        if d not in set(counts.get_column("domain").to_list()):
            raise DataError(f"domain '{name}' has no interactions left after filtering", where[name])

    dropped = [0] * n_dom
    if drop_items > 0:
        lf, dropped = _drop_items(lf, n_dom, drop_items, rng)

    # The overlapped user set U: users present in every domain. Filtering to it before
    # the sort keeps memory to the overlap (on real data a small share of the raw rows).
    shared = (
        lf.select(["domain", "user"])
        .unique()
        .group_by("user")
        .len()
        .filter(pl.col("len") == n_dom)
        .select("user")
        .collect()
    )
    if shared.height == 0:
        raise DataError("no user is present in every domain", ", ".join(str(where[n]) for n in names))
    # Keep the earliest of duplicate (user, item) pairs: by time, ties by file order.
    df = (
        lf.join(shared.lazy(), on="user", how="semi")
        .sort(["domain", "user", "ts", "line"], nulls_last=True)
        .unique(subset=["domain", "user", "item"], keep="first", maintain_order=True)
        .collect()
    )

    # Indices: users sorted by id; items grouped by domain (contiguous ranges), sorted by id.
    users = (
        shared.select(pl.col("user").sort().alias("user_id"))
        .with_row_index("user_idx")
        .with_columns(pl.col("user_idx").cast(pl.Int32))
    )
    item_parts, offsets = [], [0]
    for d, name in enumerate(names):
        ids = df.filter(pl.col("domain") == d).get_column("item").unique().sort()
        if len(ids) < negatives + 1:
            raise DataError(
                f"domain '{name}' has {len(ids)} items, fewer than --negatives+1 = {negatives + 1}", where[name]
            )
        item_parts.append(
            pl.DataFrame(
                {
                    "item_idx": pl.Series(np.arange(offsets[-1], offsets[-1] + len(ids)), dtype=pl.Int32),
                    "item_id": ids,
                    "domain": pl.Series([name] * len(ids), dtype=pl.String),
                    "domain_idx": pl.Series([d] * len(ids), dtype=pl.Int16),
                }
            )
        )
        offsets.append(offsets[-1] + len(ids))
    items_full = pl.concat(item_parts)

    df = (
        df.join(users, left_on="user", right_on="user_id")
        .join(
            items_full.select(["item_idx", "item_id", "domain_idx"]),
            left_on=["item", "domain"],
            right_on=["item_id", "domain_idx"],
        )
        .select(
            pl.col("user_idx").alias("user"),
            pl.col("item_idx").alias("item"),
            pl.col("domain"),
            pl.col("ts"),
            pl.col("line"),
        )
        .sort(["domain", "user", "ts", "line"], nulls_last=True)
    )

    # Leave-one-out by time: last -> test; second to last -> valid if >= 3; rest -> train.
    grp = ["domain", "user"]
    df = df.with_columns(
        pl.int_range(pl.len()).over(grp).alias("pos"),
        pl.len().over(grp).alias("n"),
    ).with_columns(
        pl.when(pl.col("pos") == pl.col("n") - 1)
        .then(pl.lit(2, dtype=pl.Int8))
        .when((pl.col("pos") == pl.col("n") - 2) & (pl.col("n") >= 3))
        .then(pl.lit(1, dtype=pl.Int8))
        .otherwise(pl.lit(0, dtype=pl.Int8))
        .alias("split")
    )
    train = df.filter(pl.col("split") == 0).select(["user", "item", "domain", "ts"])
    n_users = users.height
    flat = df.get_column("domain").to_numpy().astype(np.int64) * n_users + df.get_column("user").to_numpy()
    inter = np.bincount(flat, minlength=n_dom * n_users).reshape(n_dom, n_users)

    # Candidates: for each valid/test row, `negatives` items of the row's domain the user never touched.
    n_items = offsets[-1]
    keys = np.sort(df.get_column("user").to_numpy().astype(np.int64) * n_items + df.get_column("item").to_numpy())
    per_user_dom = df.group_by(grp).agg(pl.len().alias("touched"))
    evals = {}
    excluded = {}
    for s, split_name in ((1, "valid"), (2, "test")):
        rows = df.filter(pl.col("split") == s).select(["user", "domain", "item"]).join(per_user_dom, on=grp)
        rows = rows.sort(["domain", "user"])
        kept, negs = [], []
        for d, name in enumerate(names):
            lo, hi = offsets[d], offsets[d + 1]
            rd = rows.filter(pl.col("domain") == d)
            can = (hi - lo) - rd.get_column("touched").to_numpy() >= negatives
            if split_name == "test":  # the same users fail in valid: `touched` spans all splits
                excluded[name] = int((~can).sum())
            rd = rd.filter(pl.Series(can))
            u = rd.get_column("user").to_numpy()
            touched = rd.get_column("touched").to_numpy()
            # chunks of rows keep the rejection matrices small (memory ~ chunk x 2·negatives)
            neg = np.concatenate(
                [
                    sample_negatives(
                        u[c : c + NEG_CHUNK], lo, hi, keys, touched[c : c + NEG_CHUNK], n_items, negatives, rng
                    )
                    for c in range(0, len(u), NEG_CHUNK)
                ]
                or [np.zeros((0, negatives), dtype=np.int64)]
            ).astype(np.int32)
            kept.append(rd.select(["user", "domain", "item"]))
            negs.append(neg)
        tab = pl.concat(kept)
        neg_all = np.concatenate(negs)
        evals[split_name] = tab.with_columns(
            pl.Series("negatives", neg_all, dtype=pl.Array(pl.Int32, negatives)).cast(pl.List(pl.Int32))
        )
    if warn is not None:
        for name, n in excluded.items():
            if n:
                warn(
                    f"{n} users of '{name}' touched too many items to get {negatives} negatives; "
                    "left out of its valid/test"
                )

    return PreparedTables(
        domains=names,
        item_offsets=offsets,
        users=users.select(["user_idx", "user_id"]),
        items=items_full.select(["item_idx", "item_id", "domain"]),
        train=train,
        valid=evals["valid"],
        test=evals["test"],
        interactions=inter,
        excluded=excluded,
        dropped_items=dict(zip(names, dropped)),
    )


def domain_stats(t: PreparedTables, edges: tuple[int, ...] = DEFAULT_BUCKETS) -> list[dict]:
    """Per-domain counts and the activity histogram of train interactions per user."""
    n_users = t.users.height
    out = []
    for d, name in enumerate(t.domains):
        tr = t.train.filter(pl.col("domain") == d).get_column("user").to_numpy()
        va = t.valid.filter(pl.col("domain") == d).height
        te = t.test.filter(pl.col("domain") == d).height
        train_counts = np.bincount(tr, minlength=n_users)
        hist = np.bincount(bucket_index(train_counts, edges), minlength=len(edges))
        nz = t.interactions[d]
        out.append(
            {
                "domain": name,
                "users": n_users,
                "items": t.item_offsets[d + 1] - t.item_offsets[d],
                "train": int(len(tr)),
                "valid": int(va),
                "test": int(te),
                "excluded_users": int(t.excluded.get(name, 0)),
                "per_user_min": int(nz.min()),
                "per_user_median": float(np.median(nz)),
                "per_user_max": int(nz.max()),
                "buckets": dict(zip(bucket_labels(edges), (int(x) for x in hist))),
            }
        )
    return out
