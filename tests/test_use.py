"""Using a trained model: `recommend`, `export` and `evaluate --protocol full` against brute-force references."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch
from safetensors import safe_open

from conftest import run_cli
from uclr_cli import catalogue, layout, trained
from uclr_cli.data import ids
from uclr_cli.data.dataset import load_prepared
from uclr_cli.metrics import rank_candidates
from uclr_cli.stages import evaluate as ev


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """One seed: PGE (1 epoch) and NeuMF on books (1 epoch)."""
    run = tmp_path_factory.mktemp("userun") / "run"
    common = ["--data", tiny_data, "--run", run, "--seed", "0", "--epochs", "1", "--device", "cpu"]
    r = run_cli("-q", "pretrain", *common, "--batch-size", "512", "--lr", "0.01")
    assert r.exit_code == 0, r.output
    r = run_cli("-q", "baseline", "neumf", *common, "--domain", "books")
    assert r.exit_code == 0, r.output
    return run


def brute_topk(scores: np.ndarray, seen: np.ndarray, k: int) -> list[list[int]]:
    """Reference: per row, the k unseen items by score (higher first), ties to the lower index."""
    out = []
    for row, s in enumerate(scores):
        cand = np.flatnonzero(~seen[row])
        order = np.lexsort((cand, -s[cand]))  # last key first: -score, then index
        out.append(cand[order][:k].tolist())
    return out


def one_line_error(r, *needles):
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert "Traceback" not in r.output


# --- pure building blocks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("trial", range(12))
def test_topk_equals_brute_force_sort(trial):
    """Small integer vectors: many exact ties; NaN scores rank last; excluded items never listed."""
    g = torch.Generator().manual_seed(trial)
    n_users, n_items, k = 23, int(torch.randint(2, 30, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
    uv = torch.randint(-2, 3, (n_users, 3), generator=g).double()
    iv = torch.randint(-2, 3, (n_items, 3), generator=g).double()
    if trial % 3 == 0:
        iv[0, 0] = math.nan  # item 0 scores NaN for every user with a nonzero first coordinate
    tu, ti = torch.randint(0, n_users, (60,), generator=g), torch.randint(0, n_items, (60,), generator=g)
    excl = catalogue.exclusion_csr(tu, ti, n_users, n_items)
    idx, vals = catalogue.topk_items(catalogue.dot_scores(uv, iv), torch.arange(n_users), n_items, k, excl, chunk=5)
    seen = np.zeros((n_users, n_items), dtype=bool)
    seen[tu.numpy(), ti.numpy()] = True
    s = (uv @ iv.T).numpy()
    s = np.where(np.isnan(s), -np.inf, s)
    ref = brute_topk(s, seen | np.isneginf(s), k)
    got = [[i for i in row if i >= 0] for row in idx.tolist()]
    assert got == ref
    for row, items in enumerate(got):
        assert not seen[row, items].any()
        assert vals[row, : len(items)].tolist() == s[row, items].tolist()


def test_full_ranks_equal_numpy_reference():
    g = torch.Generator().manual_seed(5)
    n_users, n_items = 40, 31
    uv, iv = (
        torch.randint(-2, 3, (n_users, 2), generator=g).float(),
        torch.randint(-2, 3, (n_items, 2), generator=g).float(),
    )
    seen = torch.rand(n_users, n_items, generator=g) < 0.3
    pos = torch.tensor([int(torch.nonzero(~seen[u])[0]) for u in range(n_users)])
    tu, ti = torch.nonzero(seen, as_tuple=True)
    excl = catalogue.exclusion_csr(tu, ti, n_users, n_items)
    got = catalogue.full_ranks(catalogue.dot_scores(uv, iv), torch.arange(n_users), pos, n_items, excl, chunk=7)
    s = (uv @ iv.T).numpy()
    ref = []
    for u in range(n_users):
        others = [i for i in range(n_items) if not seen[u, i] and i != pos[u]]
        ref.append(1 + int((s[u, others] >= s[u, pos[u]]).sum()))
    assert got.tolist() == ref
    assert catalogue.n_candidates(torch.arange(n_users), n_items, excl).tolist() == (~seen).sum(1).tolist()


# --- evaluate --protocol full ------------------------------------------------------------------------------------


def numpy_full_ranks(data, users, items, split: str):
    """Per domain: (ranks, n candidates) of the test/valid positives against every non-excluded item, in NumPy."""
    tu, ti, td = (x.numpy() for x in (data.train_user, data.train_item, data.train_domain))
    out = {}
    for di, d in enumerate(data.domains):
        lo, hi = data.item_offsets[di], data.item_offsets[di + 1]
        rows = data.split(split)[d]
        excluded = np.zeros((data.n_users, hi - lo), dtype=bool)
        sel = td == di
        excluded[tu[sel], ti[sel] - lo] = True
        if split == "test":
            excluded[data.valid[d].users.numpy(), data.valid[d].pos.numpy() - lo] = True
        s = users[rows.users.numpy()] @ items[lo:hi].T
        pos = rows.pos.numpy() - lo
        ps = s[np.arange(len(pos)), pos]
        beats = (s >= ps[:, None]) & ~excluded[rows.users.numpy()]
        beats[np.arange(len(pos)), pos] = False
        out[d] = (1 + beats.sum(1), (~excluded[rows.users.numpy()]).sum(1))
    return out


def ndcg(ranks, k):
    return 100 * np.mean(np.where(ranks <= k, 1 / np.log2(ranks + 1), 0.0))


def test_full_protocol_metrics_equal_numpy_reference(tiny_data, run):
    data = load_prepared(tiny_data)
    res = ev.run(data, run, ks=(5, 10), device="cpu", protocols=("sampled", "full"))
    rep = res.report
    assert rep.schema_version == 2 and rep.protocols == ["sampled", "full"]
    assert {r.protocol for r in rep.rows} == {"sampled", "full"}
    uv, iv = (t.double().numpy() for t in trained.vectors(run / "seed-0", "PGE", data, torch.device("cpu"))["books"])
    pop = np.bincount(data.train_item.numpy(), minlength=data.n_items).astype(np.float64)
    refs = {
        "PGE": numpy_full_ranks(data, uv, iv, "test"),
        "Pop": numpy_full_ranks(data, np.ones((data.n_users, 1)), pop[:, None], "test"),
    }
    cells = {(r.model, r.domain, r.bucket, r.metric, r.k): r for r in rep.rows if r.protocol == "full"}
    for model, per_domain in refs.items():
        for d, (ranks, n_cand) in per_domain.items():
            for k in (5, 10):
                row = cells[(model, d, "all", "ndcg", k)]
                assert row.mean == pytest.approx(ndcg(ranks, k), abs=1e-9), (model, d, k)
                hr = cells[(model, d, "all", "hr", k)].mean
                assert hr == pytest.approx(100 * np.mean(ranks <= k), abs=1e-9)
            assert row.n_candidates == pytest.approx(n_cand.mean())
    # NeuMF (its own scorer) under full agrees with scoring every item through the same pair scorer
    assert ("NeuMF", "books", "all", "ndcg", 10) in cells and ("NeuMF", "movies", "all", "ndcg", 10) not in cells
    # Random: ranks within 1..N, reproducible, near its expectation (1/N) sum_{r<=K} 1/log2(r+1)
    for di, d in enumerate(data.domains):
        n_cand = refs["PGE"][d][1]
        r1 = ev.random_full_ranks(torch.from_numpy(n_cand), 0, di)
        assert torch.equal(r1, ev.random_full_ranks(torch.from_numpy(n_cand), 0, di))
        assert bool((r1 >= 1).all()) and bool((r1.numpy() <= n_cand).all())
        expect = 100 * np.mean([sum(1 / math.log2(r + 1) for r in range(1, 11)) / n for n in n_cand])
        assert cells[("Random", d, "all", "ndcg", 10)].mean == pytest.approx(expect, abs=3.0)


def test_protocol_option_and_json(tiny_data, run, tmp_path):
    r = run_cli("evaluate", "--data", tiny_data, "--run", run, "--device", "cpu", "--json", "--protocol", "full")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["schema_version"] == 2 and payload["protocols"] == ["full"]
    assert {x["protocol"] for x in payload["rows"]} == {"full"}
    r = run_cli("evaluate", "--data", tiny_data, "--run", run, "--device", "cpu", "--protocol", "sampled,full")
    assert r.exit_code == 0, r.output
    assert "sampled protocol" in r.stdout and "full protocol" in r.stdout
    one_line_error(run_cli("evaluate", "--data", tiny_data, "--run", run, "--protocol", "fll"), "--protocol")


# --- recommend ---------------------------------------------------------------------------------------------------


def recommend(tiny_data, run, *args):
    return run_cli("recommend", "--data", tiny_data, "--run", run, "--device", "cpu", *args)


def pge_books(tiny_data, run):
    data = load_prepared(tiny_data)
    uv, iv = trained.vectors(run / "seed-0", "PGE", data, torch.device("cpu"))["books"]
    lo, hi = data.item_offsets[0], data.item_offsets[1]
    return data, (uv @ iv[lo:hi].T).numpy(), lo, hi


def seen_matrix(data, di):
    lo, hi = data.item_offsets[di], data.item_offsets[di + 1]
    seen = np.zeros((data.n_users, hi - lo), dtype=bool)
    sel = (data.train_domain == di).numpy()
    seen[data.train_user.numpy()[sel], data.train_item.numpy()[sel] - lo] = True
    return seen


def test_recommend_one_user_equals_brute_force_and_excludes_seen(tiny_data, run):
    data, s, lo, _ = pge_books(tiny_data, run)
    uid, iid = ids.user_ids(data), ids.item_ids(data)
    seen = seen_matrix(data, 0)
    u = int(np.argmax(seen.sum(1)))  # the most active books user: seen items matter most
    r = recommend(tiny_data, run, "--domain", "books", "--user", uid[u], "--model", "PGE", "--top", "15", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert (got["model"], got["seed"], got["user"]) == ("PGE", 0, uid[u])
    assert [x["rank"] for x in got["items"]] == list(range(1, 16))
    ref = brute_topk(s[u : u + 1], seen[u : u + 1], 15)[0]
    assert [x["item"] for x in got["items"]] == iid[lo + np.array(ref)].tolist()
    assert not seen[u, ref].any()
    assert [x["score"] for x in got["items"]] == pytest.approx(s[u, ref].tolist(), rel=1e-6)
    # --include-seen: the plain sort over every item
    r = recommend(
        tiny_data,
        run,
        "--domain",
        "books",
        "--user",
        uid[u],
        "--model",
        "PGE",
        "--top",
        "15",
        "--json",
        "--include-seen",
    )
    ref_all = brute_topk(s[u : u + 1], np.zeros_like(seen[u : u + 1]), 15)[0]
    assert [x["item"] for x in json.loads(r.stdout)["items"]] == iid[lo + np.array(ref_all)].tolist()
    assert seen[u, ref_all].any()  # this user's seen items do reach the top 15 when kept
    # --csv: the same list
    r = recommend(tiny_data, run, "--domain", "books", "--user", uid[u], "--model", "PGE", "--top", "15", "--csv")
    assert r.exit_code == 0, r.output
    df = pl.read_csv(r.stdout.encode(), schema_overrides={"user": pl.String, "item": pl.String})
    assert df.columns == ["user", "rank", "item", "score"] and df.get_column("item").to_list() == [
        x["item"] for x in got["items"]
    ]


def test_user_without_interactions_in_the_domain_gets_a_full_list(tiny_data, run):
    data = load_prepared(tiny_data)
    cold = torch.nonzero(data.train_counts[1] == 0).ravel()  # movies
    assert len(cold), "the tiny preset has users with no train interaction in movies"
    u = ids.user_ids(data)[int(cold[0])]
    r = recommend(tiny_data, run, "--domain", "movies", "--user", u, "--top", "20", "--json")
    assert r.exit_code == 0, r.output
    items = json.loads(r.stdout)["items"]
    assert len(items) == 20 and len({x["item"] for x in items}) == 20
    assert all(math.isfinite(x["score"]) for x in items)


def test_default_model_is_the_best_on_validation(tiny_data, run):
    data = load_prepared(tiny_data)
    choice = trained.choose(run, data, ["books"], torch.device("cpu"))
    assert choice.picked and set(choice.valid) == {"NeuMF", "PGE"}
    assert choice.name == max(choice.valid, key=choice.valid.get) and choice.seed == 0
    # the score it was picked on is evaluate's sampled valid NDCG@10
    rep = ev.run(data, run, split="valid", ks=(10,), device="cpu").report
    for name, value in choice.valid.items():
        row = next(r for r in rep.rows if (r.model, r.domain, r.bucket, r.metric) == (name, "books", "all", "ndcg"))
        assert value == pytest.approx(row.mean, abs=1e-9)
    r = recommend(tiny_data, run, "--domain", "books", "--user", ids.user_ids(data)[0])
    assert r.exit_code == 0 and f"model: {choice.name} (seed 0; best on validation" in r.stderr
    choice = trained.choose(run, data, ["movies"], torch.device("cpu"))  # NeuMF has no movies model
    assert choice.name == "PGE" and set(choice.valid) == {"PGE"}


def test_batch_mode_writes_every_known_user_and_lists_unknown_ones(tiny_data, run, tmp_path):
    data = load_prepared(tiny_data)
    uid = ids.user_ids(data)
    users = tmp_path / "users.txt"
    users.write_text(f"{uid[3]}\nnobody\n\n{uid[1]}\n{uid[3]}\nghost\n")
    out = tmp_path / "out" / "rec.parquet"
    r = recommend(tiny_data, run, "--domain", "books", "--users", users, "--out", out, "--model", "PGE", "--top", "4")
    assert r.exit_code == 0, r.output
    assert "2 of 4 distinct ids are not in the data" in r.stderr
    assert (tmp_path / "out" / "rec.parquet.unknown.txt").read_text() == "nobody\nghost\n"
    df = pl.read_parquet(out)
    assert df.columns == ["user", "rank", "item", "score"]
    assert df.get_column("user").to_list() == [uid[3]] * 4 + [uid[1]] * 4
    assert df.get_column("rank").to_list() == [1, 2, 3, 4] * 2
    _, s, lo, _ = pge_books(tiny_data, run)
    seen = seen_matrix(data, 0)
    ref = brute_topk(s[[3, 1]], seen[[3, 1]], 4)
    assert df.get_column("item").to_list() == ids.item_ids(data)[lo + np.array(ref).ravel()].tolist()
    # a CSV users file with a column, CSV output
    table = tmp_path / "users.csv"
    pl.DataFrame({"x": [1, 2], "user_id": [uid[1], uid[3]]}).write_csv(table)
    out_csv = tmp_path / "rec.csv"
    r = recommend(
        tiny_data, run, "--domain", "books", "--users", table, "--out", out_csv, "--model", "PGE", "--top", "4"
    )
    assert r.exit_code == 0, r.output
    again = pl.read_csv(out_csv, schema_overrides={"user": pl.String, "item": pl.String})
    assert again.get_column("user").to_list() == [uid[1]] * 4 + [uid[3]] * 4
    assert not (tmp_path / "rec.csv.unknown.txt").exists()


def test_bad_input_is_one_line_and_writes_nothing(tiny_data, run, tmp_path):
    data = load_prepared(tiny_data)
    uid = ids.user_ids(data)[0]
    one_line_error(recommend(tiny_data, run, "--domain", "books", "--user", "no-such-user"), "no-such-user", "--user")
    one_line_error(recommend(tiny_data, run, "--domain", "sport", "--user", uid), "unknown domain 'sport'")
    one_line_error(recommend(tiny_data, run, "--domain", "books", "--user", uid, "--model", "GPT"), "GPT", "--model")
    one_line_error(
        recommend(tiny_data, run, "--domain", "movies", "--user", uid, "--model", "NeuMF"), "NeuMF", "movies"
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = tmp_path / "rec.parquet"
    one_line_error(recommend(tiny_data, run, "--domain", "books", "--users", empty, "--out", out), "no id", str(empty))
    only_unknown = tmp_path / "ghosts.txt"
    only_unknown.write_text("ghost\n")
    one_line_error(recommend(tiny_data, run, "--domain", "books", "--users", only_unknown, "--out", out), "none of")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad_out = blocker / "rec.parquet"  # its parent is a file: cannot be written
    users = tmp_path / "u.txt"
    users.write_text(f"{uid}\n")
    one_line_error(recommend(tiny_data, run, "--domain", "books", "--users", users, "--out", bad_out), str(bad_out))
    one_line_error(
        recommend(tiny_data, run, "--domain", "books", "--users", users, "--out", tmp_path / "r.json"), "r.json"
    )
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "a-file",
        "empty.txt",
        "ghosts.txt",
        "rec.parquet.unknown.txt",
        "u.txt",
    ]  # only the list of unknown ids of the all-unknown file
    bad_exp = blocker / "x.safetensors"
    r = run_cli("export", "--data", tiny_data, "--run", run, "--format", "safetensors", "--out", bad_exp)
    one_line_error(r, str(bad_exp))
    r = run_cli("export", "--data", tiny_data, "--run", run, "--format", "npy", "--out", blocker)
    one_line_error(r, str(blocker))
    assert blocker.read_text() == ""  # a file in the way of an npy folder is never replaced


# --- export ------------------------------------------------------------------------------------------------------


def load_export(path, fmt):
    """(meta, {domain: (users, items)}, user ids, {domain: item ids}) from an export, with no pickle."""
    tables, item_ids = {}, {}
    if fmt == "safetensors":
        with safe_open(str(path), framework="np") as f:
            header = f.metadata()
            meta = json.loads(header["uclr_export"])
            for d in (x["name"] for x in meta["domains"]):
                tables[d] = (f.get_tensor(f"users.{d}"), f.get_tensor(f"items.{d}"))
                item_ids[d] = json.loads(header[f"item_ids.{d}"])
            return meta, tables, json.loads(header["user_ids"]), item_ids
    if fmt == "parquet":
        meta = json.loads(pl.read_parquet_metadata(path)["uclr_export"])
        df = pl.read_parquet(path)
        user_ids = None
        for d in (x["name"] for x in meta["domains"]):
            u = df.filter((pl.col("kind") == "user") & (pl.col("domain") == d)).sort("index")
            it = df.filter((pl.col("kind") == "item") & (pl.col("domain") == d)).sort("index")
            tables[d] = (u.get_column("vector").to_numpy(), it.get_column("vector").to_numpy())
            user_ids, item_ids[d] = u.get_column("id").to_list(), it.get_column("id").to_list()
        return meta, tables, user_ids, item_ids
    meta = json.loads((path / "meta.json").read_text())
    for d in (x["name"] for x in meta["domains"]):
        tables[d] = tuple(np.load(path / f"{kind}.{d}.npy", allow_pickle=False) for kind in ("users", "items"))
        item_ids[d] = np.load(path / f"item_ids.{d}.npy", allow_pickle=False).tolist()
    return meta, tables, np.load(path / "user_ids.npy", allow_pickle=False).tolist(), item_ids


@pytest.mark.parametrize("fmt", ["safetensors", "parquet", "npy"])
def test_export_round_trip_equals_evaluate(tiny_data, run, tmp_path, fmt):
    data = load_prepared(tiny_data)
    out = tmp_path / ("exp" if fmt == "npy" else f"exp.{fmt}")
    r = run_cli("export", "--data", tiny_data, "--run", run, "--format", fmt, "--out", out, "--model", "PGE")
    assert r.exit_code == 0, r.output
    meta, tables, user_ids, item_ids = load_export(out, fmt)
    assert (meta["model"], meta["seed"], meta["fingerprint"], meta["score"]) == ("PGE", 0, data.fingerprint, "dot")
    assert [x["name"] for x in meta["domains"]] == data.domains
    assert user_ids == ids.user_ids(data).tolist()
    rep = ev.run(data, run, ks=(10,), device="cpu", variants=["PGE"]).report
    for di, d in enumerate(data.domains):
        lo, hi = data.item_offsets[di], data.item_offsets[di + 1]
        assert item_ids[d] == ids.item_ids(data)[lo:hi].tolist()
        u, it = (torch.from_numpy(np.array(x, copy=True)) for x in tables[d])
        assert u.shape == (data.n_users, meta["dim"]) and it.shape == (hi - lo, meta["dim"])
        t = data.test[d]
        ranks = rank_candidates(u, it, t.users, t.pos - lo, t.negs - lo)
        row = next(x for x in rep.rows if (x.model, x.domain, x.bucket, x.metric) == ("PGE", d, "all", "ndcg"))
        assert ndcg(ranks.numpy(), 10) == pytest.approx(row.mean, abs=1e-9)
        # the very numbers uclr scores with
        uu, ii = trained.vectors(run / "seed-0", "PGE", data, torch.device("cpu"))[d]
        assert torch.equal(u, uu) and torch.equal(it, ii[lo:hi])


def test_export_refuses_neumf_and_defaults_to_a_dot_model(tiny_data, run, tmp_path):
    out = tmp_path / "n.safetensors"
    r = run_cli(
        "export", "--data", tiny_data, "--run", run, "--format", "safetensors", "--out", out, "--model", "NeuMF"
    )
    one_line_error(r, "NeuMF is not a dot product", "--model")
    assert not out.exists()
    r = run_cli(
        "export", "--data", tiny_data, "--run", run, "--domain", "books", "--format", "npy", "--out", tmp_path / "e"
    )
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "e" / "meta.json").read_text())
    assert meta["model"] == "PGE" and [x["name"] for x in meta["domains"]] == ["books"]
    assert layout.PRETRAIN  # the run folder is untouched by export
    one_line_error(
        run_cli("export", "--data", tiny_data, "--run", run, "--format", "csv", "--out", tmp_path / "x"), "--format"
    )
