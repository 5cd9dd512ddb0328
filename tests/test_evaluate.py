"""`evaluate` and `stats`: floors, aggregation over seeds, buckets, JSON, parquet, refusals (docs/design.md §4)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from conftest import run_cli
from uclr_cli import layout
from uclr_cli.data.dataset import EvalSplit, load_prepared
from uclr_cli.errors import ConfigError, DataError
from uclr_cli.metrics import rank_candidates
from uclr_cli.stages import evaluate as ev

PLOT_ERROR = "error: --plot needs matplotlib (pip install 'uclr-cli[plot]') (--plot)"


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    """Rich tables at full width, so cells are not wrapped in the captured output."""
    monkeypatch.setenv("COLUMNS", "220")


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """A run folder with two seeds: PGE and PGE+UCL-AE, one short epoch each."""
    run = tmp_path_factory.mktemp("evalrun") / "run"
    common = ["--data", tiny_data, "--run", run, "--seeds", "0,1", "--epochs", "1", "--device", "cpu"]
    r = run_cli("-q", "pretrain", *common, "--batch-size", "512", "--lr", "0.01")
    assert r.exit_code == 0, r.output
    r = run_cli("-q", "contrast", *common, "--batch-size", "150")
    assert r.exit_code == 0, r.output
    return run


def evaluate_json(tiny_data, run, *extra) -> ev.EvalReport:
    r = run_cli("evaluate", "--data", tiny_data, "--run", run, "--device", "cpu", "--json", *extra)
    assert r.exit_code == 0, r.output
    return ev.EvalReport.model_validate_json(r.stdout)


def rows_of(report: ev.EvalReport, **match) -> list[ev.EvalRow]:
    return [r for r in report.rows if all(getattr(r, k) == v for k, v in match.items())]


def test_table_and_json_over_two_seeds(tiny_data, trained):
    r = run_cli("evaluate", "--data", tiny_data, "--run", trained, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "test of 'tiny': mean ± std over 2 seeds" in r.stdout
    for name in ("books", "movies", "music", "Random", "Pop", "PGE", "PGE+UCL-AE", "NDCG@10", "MRR@20"):
        assert name in r.stdout
    assert " ± " in r.stdout
    # Floors come first, then the variants, in each domain.
    assert r.stdout.index("Random") < r.stdout.index("Pop") < r.stdout.index("PGE ")

    rep = evaluate_json(tiny_data, trained)
    assert (rep.dataset, rep.split, rep.seeds, rep.ks) == ("tiny", "test", [0, 1], [10, 20])
    assert rep.buckets == ["0", "1-2", "3-5", "6-20", "21+"]
    data = load_prepared(tiny_data)
    for d in data.domains:
        models = [x.model for x in rows_of(rep, domain=d, bucket="all", metric="ndcg", k=10)]
        assert models == ["Random", "Pop", "PGE", "PGE+UCL-AE"]
        for x in rows_of(rep, domain=d, bucket="all"):
            assert x.n_seeds == 2 and x.std is not None
            assert x.n_users == len(data.test[d].users)
            assert 0.0 <= x.mean <= 100.0
    # Pop does not depend on the seed; Random does.
    assert all(x.std == 0.0 for x in rows_of(rep, model="Pop"))
    assert any(x.std > 0 for x in rows_of(rep, model="Random"))


def test_valid_split(tiny_data, trained):
    rep = evaluate_json(tiny_data, trained, "--split", "valid", "--k", "5")
    data = load_prepared(tiny_data)
    assert rep.split == "valid" and rep.ks == [5]
    for d in data.domains:
        (row,) = rows_of(rep, domain=d, model="PGE", bucket="all", metric="hr")
        assert row.n_users == len(data.valid[d].users)
    r = run_cli("evaluate", "--data", tiny_data, "--run", trained, "--split", "train")
    assert r.exit_code == 1 and "--split" in r.stderr


def test_pop_floor_on_hand_made_candidates(tiny_data, trained):
    """Books items 0,1,2 have 3,2,2 train interactions, every other item none."""
    data = load_prepared(tiny_data)
    lo, hi = data.item_offsets[0], data.item_offsets[1]
    assert hi - lo >= 103
    train_item = torch.tensor([0, 0, 0, 1, 1, 2, 2], dtype=torch.int64) + lo
    rows = EvalSplit(
        users=torch.tensor([0, 1, 2]),
        pos=torch.tensor([0, 1, 3]) + lo,
        negs=torch.stack(
            [
                torch.arange(1, 100),  # every negative less popular: rank 1
                torch.cat([torch.tensor([2]), torch.arange(3, 101)]),  # one tie (item 2): rank 2
                torch.arange(4, 103),  # a 0-count positive among 0-count negatives: rank 100
            ]
        )
        + lo,
    )
    test = dict(data.test, books=rows)
    hand = dataclasses.replace(data, train_item=train_item, test=test)
    rep = ev.run(hand, trained, ks=(1, 10), device="cpu").report
    got = {(x.metric, x.k): x.mean for x in rows_of(rep, domain="books", model="Pop", bucket="all")}
    expect = {
        ("mrr", 1): 100 / 3,
        ("hr", 1): 100 / 3,
        ("ndcg", 1): 100 / 3,
        ("mrr", 10): 100 * (1 + 1 / 2) / 3,
        ("hr", 10): 100 * 2 / 3,
        ("ndcg", 10): 100 * (1 + 1 / math.log2(3)) / 3,
    }
    assert got.keys() == expect.keys()
    for key, value in expect.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_constant_scorer_is_not_rewarded():
    """All-equal scores: ties go against the positive, so Random-like floors cannot cheat."""
    split = EvalSplit(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([[1, 2, 3], [1, 2, 3]]))
    ranks = rank_candidates(torch.ones(2, 1), torch.ones(4, 1), split.users, split.pos, split.negs)
    assert ranks.tolist() == [4, 4]
    a = ev.random_ranks(split, seed=3, domain_index=0)
    assert torch.equal(a, ev.random_ranks(split, seed=3, domain_index=0))


def test_mean_std_match_per_seed_parquet(tiny_data, trained, tmp_path):
    out = tmp_path / "res" / "per-seed.parquet"
    rep = evaluate_json(tiny_data, trained, "--out", out)
    assert out.is_file() and not list(out.parent.glob(".*tmp*"))
    df = pl.read_parquet(out)
    assert df.columns == ["protocol", "domain", "model", "seed", "bucket", "metric", "k", "value", "n_users"]
    assert sorted(df.get_column("seed").unique().to_list()) == [0, 1]
    groups = {}
    for _proto, dom, model, _seed, bucket, metric, k, value, _n in df.iter_rows():
        groups.setdefault((dom, model, bucket, metric, k), []).append(value)
    assert len(groups) == len(rep.rows)
    for row in rep.rows:
        vals = np.array(groups[(row.domain, row.model, row.bucket, row.metric, row.k)])
        assert len(vals) == row.n_seeds == 2
        assert row.mean == pytest.approx(vals.mean(), abs=1e-9)
        assert row.std == pytest.approx(vals.std(ddof=1), abs=1e-9)


def test_by_activity_buckets_add_up(tiny_data, trained):
    r = run_cli("evaluate", "--data", tiny_data, "--run", trained, "--device", "cpu", "--by-activity", "--k", "10")
    assert r.exit_code == 0, r.output
    assert "by activity" in r.stdout and "1-2 (" in r.stdout
    rep = evaluate_json(tiny_data, trained, "--buckets", "0,2,10")
    assert rep.buckets == ["0-1", "2-9", "10+"]
    for x in rows_of(rep, bucket="all"):
        parts = [y for y in rows_of(rep, domain=x.domain, model=x.model, metric=x.metric, k=x.k) if y.bucket != "all"]
        assert {y.bucket for y in parts} <= set(rep.buckets)
        assert sum(y.n_users for y in parts) == x.n_users
    bad = run_cli("evaluate", "--data", tiny_data, "--run", trained, "--buckets", "1,3")
    assert bad.exit_code == 1 and "--buckets" in bad.stderr


def test_json_stdout_is_pure_and_single_seed_has_no_std(tiny_data, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "seed-1", run / "seed-1")
    (run / "seed-7").mkdir()  # no checkpoint: skipped, with a warning on stderr
    r = run_cli("evaluate", "--data", tiny_data, "--run", run, "--device", "cpu", "--json", "--k", "10")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)  # nothing but the JSON on stdout
    assert payload["seeds"] == [1]
    assert "seed-7" in r.stderr and "seed-7" not in r.stdout
    rep = ev.EvalReport.model_validate(payload)
    assert all(x.n_seeds == 1 and x.std is None for x in rep.rows)
    table = run_cli("evaluate", "--data", tiny_data, "--run", run, "--device", "cpu", "--k", "10")
    assert "1 seed" in table.stdout and " ± " not in table.stdout.split("\n", 1)[1]


def test_run_folder_without_seeds_is_one_line_error(tiny_data, tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    r = run_cli("evaluate", "--data", tiny_data, "--run", empty)
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(empty) in lines[0]
    (empty / "seed-0").mkdir()
    r = run_cli("evaluate", "--data", tiny_data, "--run", empty)
    assert r.exit_code == 1 and "no checkpoint" in r.stderr and str(empty) in r.stderr
    missing = tmp_path / "nope"
    r = run_cli("evaluate", "--data", tiny_data, "--run", missing)
    assert r.exit_code == 1 and str(missing) in r.stderr
    with pytest.raises(DataError, match="seed-"):
        layout.find_seeds(tmp_path)


def test_default_run_folder_is_runs_dataset_name(tiny_data, trained, tmp_path):
    shutil.copytree(trained, tmp_path / "runs" / "tiny")
    r = run_cli("evaluate", "--data", tiny_data, "--device", "cpu", "--json", "--k", "10", cwd=tmp_path)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["seeds"] == [0, 1]


def test_bad_options_are_config_errors(tiny_data, trained):
    data = load_prepared(tiny_data)
    with pytest.raises(ConfigError, match="cut-offs"):
        ev.run(data, trained, ks=(0,))
    with pytest.raises(ConfigError, match="variant"):
        ev.run(data, trained, variants=["PGE", "nope"])
    r = run_cli("evaluate", "--data", tiny_data, "--run", trained, "--k", "ten")
    assert r.exit_code == 1 and "--k" in r.stderr
    only = ev.run(data, trained, ks=(10,), variants=["PGE"], device="cpu")
    assert only.models == ["Random", "Pop", "PGE"]


def test_plot_without_matplotlib(tiny_data, trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    png = tmp_path / "x.png"
    r = run_cli("evaluate", "--data", tiny_data, "--run", trained, "--plot", png)
    assert r.exit_code == 1
    assert r.stderr.strip() == PLOT_ERROR
    assert not png.exists()
    r = run_cli("stats", "--data", tiny_data, "--plot", png)
    assert r.exit_code == 1 and r.stderr.strip() == PLOT_ERROR


def test_plots_with_matplotlib(tiny_data, trained, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    r = run_cli(
        "evaluate", "--data", tiny_data, "--run", trained, "--device", "cpu", "--plot", tmp_path / "e.png", "--json"
    )
    assert r.exit_code == 0, r.output
    json.loads(r.stdout)
    r = run_cli("stats", "--data", tiny_data, "--plot", tmp_path / "s.png")
    assert r.exit_code == 0, r.output
    for name in ("e.png", "s.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stats_table_and_json(tiny_data):
    r = run_cli("stats", "--data", tiny_data)
    assert r.exit_code == 0, r.output
    assert "prepared 'tiny'" in r.stdout and "users by train interactions" in r.stdout
    header = next(line for line in r.stdout.splitlines() if "1-2" in line)
    assert header.index("3-5") < header.index("6-20") < header.index("21+")  # by lower edge, not as text
    r = run_cli("stats", "--data", tiny_data, "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    data = load_prepared(tiny_data)
    assert payload["name"] == "tiny" and [d["domain"] for d in payload["domains"]] == data.domains
    for di, d in enumerate(data.domains):
        hist = payload["interactions_per_user"][d]
        assert sum(n for _, n in hist) == data.n_users  # every user is in every domain
        stats = payload["domains"][di]
        assert hist[0][0] == stats["per_user_min"] and hist[-1][0] == stats["per_user_max"]


def test_uneven_seeds_are_flagged(tiny_data, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "seed-1" / "contrast.safetensors").unlink()
    res = ev.run(load_prepared(tiny_data), run, ks=(10,), device="cpu")
    assert any(w.startswith("PGE+UCL-AE: checkpoints for seed(s) 0 only") for w in res.warnings)
    ucl = [x for x in res.report.rows if x.model == "PGE+UCL-AE"]
    assert ucl and all(x.n_seeds == 1 and x.std is None for x in ucl)
    r = run_cli("evaluate", "--data", tiny_data, "--run", run, "--device", "cpu", "--k", "10")
    assert r.exit_code == 0 and "seeds" in r.stdout.splitlines()[2]  # a column says how many


def test_docs_schema_is_current():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "evaluate-json.md").read_text()
    block = doc.split("## JSON Schema", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    assert json.loads(block) == ev.EvalReport.model_json_schema()
