"""`prepare`: the split, the candidates, determinism, and refusals (docs/design.md §2)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import SHARED_DOUBAN, run_cli
from uclr_cli.data.dataset import load_prepared
from uclr_cli.data.raw import RawDomain
from uclr_cli.data.split import bucket_index, bucket_labels, build_tables
from uclr_cli.errors import DataError


def raw(name, rows, with_ts=True):
    """rows: (user, item, ts) triples in file order."""
    return RawDomain(
        name=name,
        frame=pl.DataFrame(
            {
                "user": [r[0] for r in rows],
                "item": [r[1] for r in rows],
                "rating": [5.0] * len(rows),
                "ts": [r[2] if with_ts else None for r in rows],
                "line": list(range(1, len(rows) + 1)),
            },
            schema={"user": pl.String, "item": pl.String, "rating": pl.Float64, "ts": pl.Int64, "line": pl.Int64},
        ),
    )


def all_tables(path: Path):
    return {k: pl.read_parquet(path / f"{k}.parquet") for k in ("users", "items", "train", "valid", "test")}


def test_split_invariants_on_synthetic(tiny_data):
    t = all_tables(tiny_data)
    n_users = t["users"].height
    train, valid, test = t["train"], t["valid"], t["test"]
    items = t["items"]
    dom_of_item = items.get_column("domain").to_numpy()
    names = list(dict.fromkeys(dom_of_item))
    # every user is in every domain (each has a test row, none left out in this data)
    for d in range(len(names)):
        assert set(test.filter(pl.col("domain") == d)["user"].to_list()) == set(range(n_users))
    touched = {}
    for df in (train, valid, test):
        for u, i in zip(df["user"].to_list(), df["item"].to_list()):
            touched.setdefault(u, set()).add(i)
    train_pairs = set(zip(train["user"].to_list(), train["item"].to_list()))
    for df in (valid, test):
        for u, d, i, negs in df.select(["user", "domain", "item", "negatives"]).iter_rows():
            assert len(negs) == 99 and len(set(negs)) == 99
            assert i not in negs
            assert all(dom_of_item[n] == names[d] for n in negs)
            assert dom_of_item[i] == names[d]
            assert not (set(negs) & touched[u])
            assert (u, i) not in train_pairs


def test_leave_one_out_by_time_and_file_order():
    a = raw(
        "a",
        [("u1", "x1", 30), ("u1", "x2", 10), ("u1", "x3", 20), ("u2", "x1", 5), ("u2", "x4", 6)]
        + [("u9", f"x{k}", k) for k in range(5, 12)],
    )
    b = raw(
        "b",
        [("u1", "y1", None), ("u1", "y2", None), ("u2", "y2", None), ("u9", "y3", None)]
        + [("u9", f"y{k}", None) for k in range(4, 9)],
        with_ts=False,
    )
    t = build_tables([a, b], negatives=2, seed=0)
    uid = {v: k for k, v in t.users.iter_rows()}
    iid = dict(zip(t.items["item_id"].to_list(), t.items["item_idx"].to_list()))
    test = {(u, d): i for u, d, i in t.test.select(["user", "domain", "item"]).iter_rows()}
    valid = {(u, d): i for u, d, i in t.valid.select(["user", "domain", "item"]).iter_rows()}
    # u1 in a: times 10 (x2), 20 (x3), 30 (x1): test x1, valid x3, train x2
    assert test[(uid["u1"], 0)] == iid["x1"] and valid[(uid["u1"], 0)] == iid["x3"]
    # u2 in a has 2 interactions: test only, no valid
    assert test[(uid["u2"], 0)] == iid["x4"] and (uid["u2"], 0) not in valid
    # domain b has no timestamps: file order decides; u1 has 2 -> y2 test, y1 train
    assert test[(uid["u1"], 1)] == iid["y2"]
    # u2 has 1 interaction in b: test only (the cross-domain cold case)
    assert test[(uid["u2"], 1)] == iid["y2"]
    assert t.train.filter((pl.col("user") == uid["u2"]) & (pl.col("domain") == 1)).height == 0
    # one global item index, each domain a contiguous range
    assert t.item_offsets[0] == 0 and t.items.filter(pl.col("domain") == "a")["item_idx"].max() < t.item_offsets[1]


def test_duplicates_keep_earliest_and_overlap_filter():
    a = raw(
        "a",
        [("u1", "x1", 50), ("u1", "x1", 10), ("u1", "x2", 20), ("u3", "x3", 1)]
        + [("u1", f"x{k}", 100 + k) for k in range(4, 8)],
    )
    b = raw("b", [("u1", "y1", 1)] + [("u1", f"y{k}", 1 + k) for k in range(2, 6)])
    t = build_tables([a, b], negatives=2, seed=0)
    assert t.users["user_id"].to_list() == ["u1"]  # u3 is only in domain a
    tr = t.train.filter(pl.col("domain") == 0)
    ids = dict(zip(t.items["item_idx"].to_list(), t.items["item_id"].to_list()))
    # x1 kept once, at its earliest time 10
    x1 = [ts for i, ts in zip(tr["item"].to_list(), tr["ts"].to_list()) if ids[i] == "x1"]
    assert x1 == [10]


def test_heavy_user_left_out_and_counted():
    # u1 touches 4 of the 5 items: only 1 left, fewer than 2 negatives -> left out of valid/test
    a = raw("a", [("u1", f"x{k}", k) for k in range(4)] + [("u2", "x4", 1), ("u2", "x0", 2)])
    b = raw("b", [("u1", "y0", 1), ("u2", "y1", 1), ("u2", "y2", 2), ("u1", "y3", 5), ("u2", "y4", 3)])
    warnings = []
    t = build_tables([a, b], negatives=2, seed=0, warn=warnings.append)
    assert t.excluded["a"] == 1 and t.excluded["b"] == 0
    assert t.test.filter(pl.col("domain") == 0).height == 1
    assert warnings and "'a'" in warnings[0]


def test_dense_user_exact_fallback():
    # u1 touched 6 of 10 items (> half): the exact complement draw is used
    a = raw("a", [("u1", f"x{k}", k) for k in range(6)] + [("u2", f"x{k}", k) for k in range(6, 10)])
    b = raw("b", [("u1", f"y{k}", k) for k in range(4)] + [("u2", f"y{k}", k) for k in range(4)])
    t = build_tables([a, b], negatives=3, seed=1)
    row = t.test.filter(pl.col("domain") == 0).sort("user").row(0, named=True)
    touched = set(t.train.filter((pl.col("user") == row["user"]) & (pl.col("domain") == 0))["item"].to_list())
    assert len(set(row["negatives"])) == 3 and not set(row["negatives"]) & (touched | {row["item"]})


def test_same_seed_byte_identical_and_seed_matters(tmp_path):
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        r = run_cli("prepare", "synthetic", "--preset", "tiny", "--seed", seed, "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
        outs.append(
            {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp_path / name).glob("*.parquet"))}
        )
    assert len(outs[0]) == 5 and outs[0] == outs[1]
    assert outs[0]["test.parquet"] != outs[2]["test.parquet"]


def test_loader_matches_manifest(tiny_data):
    ds = load_prepared(tiny_data)
    assert ds.n_users == 300 and len(ds.domains) == 3
    assert ds.item_offsets[-1] == ds.n_items
    for d, name in enumerate(ds.domains):
        ev = ds.test[name]
        assert ev.negs.shape == (len(ev.users), 99)
        lo, hi = ds.item_offsets[d], ds.item_offsets[d + 1]
        assert bool(((ev.negs >= lo) & (ev.negs < hi)).all()) and bool(((ev.pos >= lo) & (ev.pos < hi)).all())
    assert int(ds.train_counts.sum()) == len(ds.train_user)


def test_loader_refuses_modified_file(tmp_path, tiny_data):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    load_prepared(copy)  # a copy elsewhere loads: nothing absolute inside
    (copy / "train.parquet").write_bytes((copy / "train.parquet").read_bytes()[:-10])
    with pytest.raises(DataError, match="train.parquet"):
        load_prepared(copy)


def test_buckets():
    assert bucket_labels() == ["0", "1-2", "3-5", "6-20", "21+"]
    assert bucket_index(np.array([0, 1, 2, 3, 5, 6, 20, 21, 500])).tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_refuses_too_few_items_and_no_shared_user(tmp_path):
    a = raw("a", [("u1", "x1", 1), ("u1", "x2", 2)])
    b = raw("b", [("u1", "y1", 1), ("u1", "y2", 2), ("u1", "y3", 3)])
    with pytest.raises(DataError, match="fewer than --negatives"):
        build_tables([a, b], negatives=2)
    c = raw("c", [("u2", "z1", 1)] * 5)
    with pytest.raises(DataError, match="no user is present in every domain"):
        build_tables([b, c], negatives=1)


def test_cli_errors_leave_nothing(tmp_path):
    out = tmp_path / "o"
    r = run_cli(
        "prepare", "synthetic", "--users", "10", "--items", "50,50,50", "--interactions", "30,30,30", "--out", out
    )
    assert r.exit_code == 1
    assert r.stderr.startswith("error: ") and "--negatives" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())
    r = run_cli("prepare", "douban", tmp_path / "missing", "--out", out)
    assert r.exit_code == 1 and "missing" in r.stderr and not out.exists()
    r = run_cli("prepare", "synthetic", "--drop-items", "1.5", "--out", out)
    assert r.exit_code == 1 and "--drop-items" in r.stderr
    r = run_cli("prepare", "synthetic", "--no-such-flag")
    assert r.exit_code == 2


def test_cli_json_and_version(tmp_path):
    import json

    r = run_cli("prepare", "synthetic", "--preset", "tiny", "--out", tmp_path / "t", "--json")
    assert r.exit_code == 0
    payload = json.loads(r.stdout)
    assert [d["domain"] for d in payload["domains"]] == ["books", "movies", "music"]
    assert sum(payload["domains"][0]["buckets"].values()) == payload["n_users"] == 300
    r = run_cli("--version")
    assert r.exit_code == 0 and r.stdout.startswith("uclr ")


@pytest.mark.skipif(not SHARED_DOUBAN.exists(), reason="shared Douban data not present")
def test_prepare_real_douban(tmp_path):
    r = run_cli("prepare", "douban", SHARED_DOUBAN, "--out", tmp_path / "douban", "--json")
    assert r.exit_code == 0, r.output
    import json

    payload = json.loads(r.stdout)
    assert {d["domain"] for d in payload["domains"]} == {"book", "music"}
    assert payload["n_users"] == 1566
