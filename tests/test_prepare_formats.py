"""`uclr prepare` end to end on hand-written fixtures of every raw format, and every refusal through the CLI."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from conftest import run_cli

USERS = ["A2SUAM1J3GNN3B", "A1D87F6ZCVE5NK", "A3NHUQ33CFH3VM", "A2GKMXRLI7KLFP"]


def asin(k: int, digits: bool) -> str:
    return f"{k:010d}" if digits else f"B00{k:07d}"


def rows(domain_seed: int, n_items: int = 8):
    """Every user rates 4 items of the domain at increasing times."""
    out = []
    for ui, u in enumerate(USERS):
        for t in range(4):
            out.append((u, (ui * 3 + t + domain_seed) % n_items, 1_300_000_000 + 1000 * t + ui))
    return out


def write_format(raw: Path, fmt: str) -> None:
    raw.mkdir()
    for d, (cat, digits) in enumerate((("Books", True), ("Movies_and_TV", False))):
        rs = rows(d)
        if fmt == "amazon-2014-csv":
            (raw / f"ratings_{cat}.csv").write_text("".join(f"{u},{asin(i, digits)},5.0,{ts}\n" for u, i, ts in rs))
        elif fmt == "amazon-2018-csv":
            (raw / f"{cat}.csv").write_text("".join(f"{asin(i, digits)},{u},4.0,{ts}\n" for u, i, ts in rs))
        elif fmt == "amazon-review-json-gz":
            lines = [
                json.dumps(
                    {"reviewerID": u, "asin": asin(i, digits), "overall": 5.0, "unixReviewTime": ts, "reviewText": "ok"}
                )
                for u, i, ts in rs
            ]
            with gzip.open(raw / f"reviews_{cat}_5.json.gz", "wt") as f:
                f.write("\n".join(lines) + "\n")
        elif fmt == "amazon-2023-jsonl":
            lines = [
                json.dumps({"user_id": u, "parent_asin": asin(i, digits), "rating": 3.0, "timestamp": ts * 1000})
                for u, i, ts in rs
            ]
            (raw / f"{cat}.jsonl").write_text("\n".join(lines) + "\n")
        elif fmt == "douban-release":
            dom = ("book", "music")[d]
            (raw / f"douban_{dom}").mkdir()
            (raw / f"douban_{dom}" / "ratings.dat").write_text(
                "".join(f"{USERS.index(u)}\t{i}\t4\n" for u, i, ts in rs)
            )
        elif fmt == "douban-text":
            dom = ("book", "music")[d]
            body = "".join(f'"{u}"\t"{i}"\t"4"\t"2010-01-0{1 + k % 4}"\t"nice"\n' for k, (u, i, ts) in enumerate(rs))
            (raw / f"{dom}reviews_cleaned.txt").write_text(
                f'"user_id"\t"{dom}_id"\t"rating"\t"time"\t"comment"\n' + body
            )
        elif fmt == "files":
            dom = ("books", "movies")[d]
            pl.DataFrame(
                {
                    "user": [u for u, _, _ in rs],
                    "item": [f"it{i}" for _, i, _ in rs],
                    "timestamp": [ts for *_, ts in rs],
                }
            ).write_csv(raw / f"{dom}.csv")


SOURCE = {
    "amazon-2014-csv": "amazon",
    "amazon-2018-csv": "amazon",
    "amazon-review-json-gz": "amazon",
    "amazon-2023-jsonl": "amazon",
    "douban-release": "douban",
    "douban-text": "douban",
    "files": "files",
}


@pytest.mark.parametrize("fmt", list(SOURCE))
def test_prepare_every_format_end_to_end(tmp_path, fmt):
    raw = tmp_path / "raw"
    write_format(raw, fmt)
    out = tmp_path / "out"
    r = run_cli("prepare", SOURCE[fmt], raw, "--out", out, "--negatives", "2", "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert len(payload["domains"]) == 2
    test = pl.read_parquet(out / "test.parquet")
    train = pl.read_parquet(out / "train.parquet")
    items = pl.read_parquet(out / "items.parquet")
    n_users = pl.read_parquet(out / "users.parquet").height
    assert test.height == 2 * n_users  # every user in every domain
    dom = items["domain"].to_list()
    names = payload and [d["domain"] for d in payload["domains"]]
    for u, d, i, negs in test.select(["user", "domain", "item", "negatives"]).iter_rows():
        seen = set(train.filter(pl.col("user") == u)["item"].to_list()) | {i}
        assert len(set(negs)) == 2 and not set(negs) & seen
        assert all(dom[n] == names[d] for n in negs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert all("/" not in s.get("file", "") for s in manifest["sources"])
    assert str(tmp_path) not in (out / "manifest.json").read_text()


def _amazon(raw: Path, text: str, name: str = "ratings_Books.csv") -> None:
    raw.mkdir(exist_ok=True)
    (raw / name).write_text(text)


GOOD = "".join(f"{u},{asin(i, True)},5.0,{1300000000 + i}\n" for u in USERS for i in range(4))


def case_missing(raw):
    pass


def case_empty(raw):
    raw.mkdir()


def case_wrong_columns(raw):
    _amazon(raw, GOOD + "A2SUAM1J3GNN3B,0000013714,5.0\n")


def case_bad_rating(raw):
    _amazon(raw, GOOD + "A2SUAM1J3GNN3B,0000013714,five,1300000000\n")


def case_bad_time(raw):
    _amazon(raw, GOOD + "A2SUAM1J3GNN3B,0000013714,5.0,yesterday\n")


def case_truncated_gz(raw):
    raw.mkdir()
    data = gzip.compress(
        (
            "\n".join(
                json.dumps({"reviewerID": u, "asin": asin(1, True), "overall": 5.0, "unixReviewTime": 1})
                for u in USERS * 50
            )
        ).encode()
    )
    (raw / "reviews_Books_5.json.gz").write_bytes(data[: len(data) // 2])


def case_few_items(raw):
    _amazon(raw, GOOD)
    _amazon(raw, "".join(f"{u},B000000001,5.0,1\n" for u in USERS), "ratings_Movies_and_TV.csv")


def case_no_shared_user(raw):
    _amazon(raw, GOOD)
    _amazon(raw, "".join(f"AZZZZZZZZZZZZ{k},B00000000{k},5.0,1\n" for k in range(5)), "ratings_Movies_and_TV.csv")


def case_unknown_domain(raw):
    _amazon(raw, GOOD)


CASES = [
    (case_missing, [], "folder not found", "raw"),
    (case_empty, [], "no recognised Amazon file", "raw"),
    (case_wrong_columns, [], "line 17", "ratings_Books.csv"),
    (case_bad_rating, [], "line 17", "ratings_Books.csv"),
    (case_bad_time, [], "line 17", "ratings_Books.csv"),
    (case_truncated_gz, [], "gzip", "reviews_Books_5.json.gz"),
    (case_few_items, ["--negatives", "3"], "fewer than --negatives", "ratings_Movies_and_TV.csv"),
    (case_no_shared_user, ["--negatives", "1"], "no user is present in every domain", "ratings_Books.csv"),
    (case_unknown_domain, ["--domains", "games"], "unknown domain 'games'", "--domains"),
]


@pytest.mark.parametrize("make, extra, words, where", CASES, ids=[c[0].__name__ for c in CASES])
def test_prepare_refusals_through_the_cli(tmp_path, make, extra, words, where):
    raw = tmp_path / "raw"
    make(raw)
    out = tmp_path / "out"
    r = run_cli("prepare", "amazon", raw, "--out", out, *extra)
    assert r.exit_code == 1, r.output
    err = r.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in r.output
    assert words in err and where in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left
