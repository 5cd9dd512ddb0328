"""HeroGraph (issue 14), reconstructed from the paper's description: the shared graph, the neighbour sample and the
recurrent attention are the known ones; the joint model learns, is deterministic, resumes bit for bit, never reads
valid/test rows, refuses foreign checkpoints, and shows up in the CLI, evaluate, recommend and export."""

from __future__ import annotations

import json
import math
import shutil
import signal

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_cli, uclr_process
from test_baselines import random_ndcg, two_groups
from test_cat_art import by_stage
from test_reliability import same_tensors, wait_for
from test_resume import kill_and_resume
from uclr_cli import checkpoint as ckpt
from uclr_cli import layout
from uclr_cli import trained as tr
from uclr_cli.config import HeroGraphConfig
from uclr_cli.data import ids
from uclr_cli.data.dataset import load_prepared
from uclr_cli.errors import CheckpointError
from uclr_cli.metrics import summarize
from uclr_cli.models.herograph import HeroGraph, HeroTarget, RecurrentAttention, SharedGraph, by_width
from uclr_cli.stages import evaluate as ev
from uclr_cli.stages import herograph as hg

CPU = torch.device("cpu")
FAST = dict(dim=16, epochs=3, patience=3, lr=0.03, batch_size=512, device="cpu")


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")


@pytest.fixture(scope="module")
def data(tiny_data):
    return load_prepared(tiny_data)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("herograph")
    return run, hg.run_seed(HeroGraphConfig(**FAST), data, run, 0, data.domains)


# --------------------------------------------------------------------------- learning


def test_beats_random_clearly_and_the_checkpoint_scores_what_was_reported(data, trained):
    run, results = trained
    target = by_stage(results, hg.TARGET)
    assert set(target) == set(data.domains)
    for d in data.domains:
        assert target[d].best_score > 2 * random_ndcg(data.valid[d]), (d, target[d].best_score)
        assert target[d].best_epoch >= 1
        model = tr.load_baseline(run / "seed-0", "herograph", data, d, CPU)
        assert tr.baseline_valid_score(model, data, d) == pytest.approx(target[d].best_score, abs=1e-6)
    assert len({r.seconds for r in target.values()}) == 1  # one joint run, its time shared by the target rows


def test_hand_made_two_groups(tmp_path):
    """Two groups of users with disjoint items: the model ranks the held item of the user's group first."""
    hand = two_groups()
    cfg = HeroGraphConfig(**{**FAST, "dim": 8, "epochs": 12, "patience": 12, "lr": 0.05, "batch_size": 32})
    res = by_stage(hg.run_seed(cfg, hand, tmp_path, 0, ["b"]), hg.TARGET)["b"]
    model = tr.load_baseline(tmp_path / "seed-0", "herograph", hand, "b", CPU)
    v = hand.valid["b"]
    ranks = tr.rank_model(model, v.users, v.pos, v.negs)
    assert (ranks == 1).float().mean() >= 0.95, ranks.tolist()
    assert res.best_score >= 0.95


# --------------------------------------------------------------------------- the building blocks


def test_shared_graph_and_neighbour_sample_are_the_known_ones():
    # users 0, 1, 2 and items 0..5 (nodes 3..8); user 0 has items 0-4 (degree 5), user 1 item 5, user 2 none
    users, items = torch.tensor([0, 0, 0, 0, 0, 1, 0]), torch.tensor([0, 1, 2, 3, 4, 5, 0])  # (0, 0) twice
    g = SharedGraph(users, items, 3, 6)
    assert g.degree.tolist() == [5, 1, 0, 1, 1, 1, 1, 1, 1]
    gen = torch.Generator().manual_seed(0)
    seen = torch.zeros(9, dtype=torch.int64)
    for _ in range(300):
        s = g.sample(2, gen)
        assert s.shape == (9, 2)
        assert s[1].tolist() == [8, -1] and s[2].tolist() == [-1, -1] and s[8].tolist() == [1, -1]
        assert all(s[n].tolist() == [0, -1] for n in range(3, 8))
        a, b = s[0].tolist()
        assert a != b and {a, b} <= {3, 4, 5, 6, 7}  # without replacement, neighbours only
        seen.index_add_(0, s[0], torch.ones(2, dtype=torch.int64))
    assert seen[3:8].min() >= 90 and seen[3:8].max() <= 150  # uniform: 120 each
    assert g.sample(30, gen)[0].sort().values[-5:].tolist() == [3, 4, 5, 6, 7]  # k >= degree: all of them


def test_recurrent_attention_by_hand():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        agg = RecurrentAttention(4, steps=2)
        h0, nbr = torch.randn(3, 4), torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    want = []
    for r in range(3):  # one node at a time, only its real neighbours
        h, g = h0[r : r + 1], nbr[r, mask[r]]
        for _ in range(2):
            if len(g):
                a = torch.softmax(g @ agg.query(h)[0] / 2.0, 0)
                c = (a.unsqueeze(1) * g).sum(0, keepdim=True)
            else:
                c = torch.zeros(1, 4)  # no neighbours: nothing to attend to
            h = agg.gru(c, h)
        want.append(h)
    got = agg(h0, nbr, mask)
    assert got.shape == (3, 4) and torch.allclose(got, torch.cat(want), atol=1e-6)
    nbr2 = nbr.clone()
    nbr2[~mask] = 1e3  # what sits in a padded slot is never read
    assert torch.equal(agg(h0, nbr2, mask), got)
    # grouped by neighbour count, each group only as wide as it needs: the same vectors as one full-width pass
    table = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    g = SharedGraph(torch.tensor([0] * 9 + [1] * 3 + [2]), torch.tensor([*range(9), 0, 1, 2, 5]), 3, 17)
    nodes = torch.arange(20)
    s = g.sample(6, torch.Generator().manual_seed(2))
    full = agg(table[nodes], table[s.clamp(min=0)], s >= 0)
    assert torch.allclose(by_width(agg, table, nodes, s.clamp(min=0), s >= 0), full, atol=1e-6)


def test_model_shapes_and_the_score_is_both_dot_products():
    gen = torch.Generator().manual_seed(0)
    m = HeroGraph(5, [0, 3, 7], 4, steps=2, gen=gen)
    assert m.users.shape == (10, 4) and m.items.shape == (7, 4) and m.graph.shape == (12, 4)
    assert [n for n, _ in m.dense_parameters()][:2] == ["user_agg.query.weight", "user_agg.query.bias"]
    graph = SharedGraph(torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([0, 1, 3, 4, 6, 5]), 5, 7)
    nbrs = graph.sample(3, gen)
    hu = m.graph_vectors(torch.arange(5), nbrs, users=True)
    t = m.target_tensors(1, hu, nbrs)
    assert {k: tuple(v.shape) for k, v in t.items()} == {
        "users": (5, 4),
        "items": (4, 4),
        "graph_users": (5, 4),
        "graph_items": (4, 4),
    }
    assert torch.equal(t["users"], m.users[5:10]) and torch.equal(t["items"], m.items[3:7])
    target = HeroTarget(5, 4, 3, 4)
    target.load_tensors(t)
    users, items = target.tables()
    assert users.shape == (5, 8) and items.shape == (4, 8)
    want = t["users"][2] @ t["items"][1] + t["graph_users"][2] @ t["graph_items"][1]
    assert torch.isclose(target.score(torch.tensor([2]), torch.tensor([[4]]))[0, 0], want, atol=1e-6)
    # the objective reads the rows it reports, and only they get gradients
    u, i, j = torch.tensor([2, 2]), torch.tensor([4, 5]), torch.tensor([6, 3])
    loss, touched = m.objective(1, u, i, j, nbrs, 1e-3)
    loss.backward()
    assert touched["users"][0].tolist() == [7] and touched["items"][0].tolist() == [3, 4, 5, 6]
    assert set(touched["graph"][0].tolist()) >= {2, 8, 9, 10, 11}
    assert all(leaf.grad is not None and leaf.grad.shape == leaf.shape for _, leaf in touched.values())
    assert m.user_agg.query.weight.grad is not None and m.item_agg.gru.weight_hh.grad is not None


def test_cycled_order_gives_every_target_the_same_batches():
    gen = torch.Generator().manual_seed(0)
    o = hg.cycled_order(3, 8, gen)
    assert len(o) == 8 and sorted(o[:3].tolist()) == [0, 1, 2] and sorted(o[3:6].tolist()) == [0, 1, 2]
    assert sorted(hg.cycled_order(8, 8, gen).tolist()) == list(range(8)) and len(hg.cycled_order(0, 8, gen)) == 0


# --------------------------------------------------------------------------- no leakage


def test_graph_and_samples_hold_train_edges_only(data):
    g = hg.shared_graph(data, CPU)
    n_u = data.n_users
    edges = set(zip(g.src.tolist(), g.col.tolist()))
    train = set(zip(data.train_user.tolist(), (data.train_item + n_u).tolist()))
    assert edges == train | {(i, u) for u, i in train}
    held = {
        (int(u), int(p) + n_u) for sp in (data.valid, data.test) for s in sp.values() for u, p in zip(s.users, s.pos)
    }
    assert held and not held & edges  # there is something to leak, and none of it is in the graph
    s = g.sample(30, torch.Generator().manual_seed(0))
    pairs = {(n, int(x)) for n, row in enumerate(s.tolist()) for x in row if x >= 0}
    assert pairs <= edges and not {(u, p) for u, p in held} & pairs and not {(p, u) for u, p in held} & pairs


def test_trained_the_same_whatever_the_held_out_positives(data, tmp_path):
    """With one epoch there is nothing to select: valid/test positives shuffled give the same tensors."""
    cfg = HeroGraphConfig(**{**FAST, "epochs": 1})
    shuffled = load_prepared(data.path)
    for d in data.domains:
        shuffled.valid[d].pos = shuffled.valid[d].pos.flip(0)
        shuffled.test[d].pos = shuffled.test[d].pos.flip(0)
    hg.run_seed(cfg, data, tmp_path / "a", 0, data.domains)
    hg.run_seed(cfg, shuffled, tmp_path / "b", 0, data.domains)
    for name in [layout.baseline_name("herograph", d) for d in data.domains] + [
        layout.resume_name(layout.HEROGRAPH_JOINT)
    ]:
        ta, tb = load_file(str(tmp_path / "a" / "seed-0" / name)), load_file(str(tmp_path / "b" / "seed-0" / name))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name


# --------------------------------------------------------------------------- determinism, resume, refusal


def test_same_seed_bit_identical_other_seed_differs(data, trained, tmp_path):
    run, _ = trained
    hg.run_seed(HeroGraphConfig(**FAST), data, tmp_path / "b", 0, data.domains)
    hg.run_seed(HeroGraphConfig(**{**FAST, "epochs": 1}), data, tmp_path / "c", 1, data.domains)
    name = layout.baseline_name("herograph", "books")
    a, b = load_file(str(run / "seed-0" / name)), load_file(str(tmp_path / "b" / "seed-0" / name))
    c = load_file(str(tmp_path / "c" / "seed-1" / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a)
    state = layout.resume_name(layout.HEROGRAPH_JOINT)
    assert same_tensors(run / "seed-0" / state, tmp_path / "b" / "seed-0" / state)


def test_kill_and_resume_bit_identical(data, tmp_path):
    cfg = HeroGraphConfig(**{**FAST, "epochs": 3, "patience": 10})

    def train(run_, progress, resume):
        hg.run_seed(cfg, data, run_, 0, data.domains, resume=resume, progress=progress)

    files = [layout.baseline_name("herograph", d) for d in data.domains]
    kill_and_resume(train, tmp_path / "ref", tmp_path / "cut", [*files, layout.resume_name(layout.HEROGRAPH_JOINT)])


@pytest.mark.slow  # three child processes (~28 s on 2 busy cores); the in-process kill above runs by default
def test_sigkill_then_resume_equals_an_unbroken_run(tiny_data, tmp_path):
    """A real SIGKILL of `uclr baseline herograph` once it has saved an epoch; `--resume` finishes it with the
    tensors of an unbroken run (both in child processes, one thread each)."""
    args = ["baseline", "herograph", "--data", tiny_data, "--dim", "8", "--epochs", "6", "--patience", "10"]
    args += ["--batch-size", "128", "--device", "cpu"]
    ref = uclr_process(*args, "--run", tmp_path / "ref", cwd=tmp_path)
    cut = tmp_path / "cut"
    p = uclr_process(*args, "--run", cut, cwd=tmp_path)
    state = cut / "seed-0" / layout.resume_name(layout.HEROGRAPH_JOINT)
    wait_for(lambda: state.exists() or p.poll() is not None)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert state.exists() and not ckpt.read_header(state)["done"], "the kill came too late; make the run longer"
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    p = uclr_process(*args, "--run", cut, "--resume", cwd=tmp_path)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    names = [layout.baseline_name("herograph", d) for d in ("books", "movies", "music")]
    for name in [*names, layout.resume_name(layout.HEROGRAPH_JOINT)]:
        assert same_tensors(tmp_path / "ref" / "seed-0" / name, cut / "seed-0" / name), name


def test_load_and_resume_refuse_what_is_not_theirs(data, trained, tmp_path):
    run, _ = trained
    sd = tmp_path / "seed-0"
    sd.mkdir()
    path = run / "seed-0" / layout.baseline_name("herograph", "books")
    shutil.copy(path, sd / layout.baseline_name("ga-mtcdr", "books"))
    with pytest.raises(CheckpointError, match="stage 'baseline-herograph', expected 'baseline-ga-mtcdr'"):
        tr.load_baseline(sd, "ga-mtcdr", data, "books", CPU)
    shutil.copy(path, sd / layout.baseline_name("herograph", "music"))
    with pytest.raises(CheckpointError, match="domain='books', expected 'music'"):
        tr.load_baseline(sd, "herograph", data, "music", CPU)
    meta = {k: v for k, v in ckpt.read_header(path).items() if k not in ("format_version", "package_version")}
    t = load_file(str(path))
    t["graph_items"] = t["graph_items"][:, :8]
    ckpt.save(sd / layout.baseline_name("herograph", "books"), t, meta)
    with pytest.raises(CheckpointError, match="does not match"):
        tr.load_baseline(sd, "herograph", data, "books", CPU)
    other = tmp_path / "other"
    shutil.copytree(run, other)
    with pytest.raises(CheckpointError, match="other config"):
        hg.run_seed(HeroGraphConfig(**{**FAST, "neighbours": 5}), data, other, 0, data.domains, resume=True)


# --------------------------------------------------------------------------- CLI, evaluate, recommend, export


ARGS = ["--dim", "8", "--epochs", "2", "--batch-size", "512", "--lr", "0.03", "--device", "cpu"]


def test_cli_trains_and_evaluate_recommend_export_use_it(tiny_data, tmp_path):
    run = tmp_path / "r"
    r = run_cli("baseline", "herograph", "--data", tiny_data, "--run", run, *ARGS, "--domain", "music")
    assert r.exit_code == 0, r.output
    assert "baseline-herograph: best validation NDCG@10" in r.stdout
    assert (run / "seed-0" / layout.baseline_name("herograph", "music")).is_file()
    assert not (run / "seed-0" / layout.baseline_name("herograph", "books")).exists()
    r = run_cli(
        "evaluate", "--data", tiny_data, "--run", run, "--device", "cpu", "--json", "--k", "10", "--by-activity"
    )
    assert r.exit_code == 0, r.output
    rep = ev.EvalReport.model_validate_json(r.stdout)
    rows = [x for x in rep.rows if x.model == "HeroGraph"]
    assert {x.domain for x in rows} == {"music"} and {x.bucket for x in rows} > {"all"}
    data = load_prepared(tiny_data)
    model = tr.load_baseline(run / "seed-0", "herograph", data, "music", CPU)
    t = data.test["music"]
    want = 100 * summarize(tr.rank_model(model, t.users, t.pos, t.negs), [10])[("ndcg", 10)]
    (row,) = [x for x in rows if x.bucket == "all" and x.metric == "ndcg" and x.k == 10]
    assert row.mean == pytest.approx(want, abs=1e-9) and not math.isnan(row.mean)
    models = [x.model for x in rep.rows if x.domain == "music" and x.bucket == "all" and x.metric == "ndcg"]
    assert models == ["Random", "Pop", "HeroGraph"]
    r = run_cli("evaluate", "--data", tiny_data, "--run", run, "--device", "cpu", "--k", "10")
    assert r.exit_code == 0 and "HeroGraph" in r.stdout, r.output
    # recommend: the top items by [E_u, h_u] · [E_i, h_i], train items left out
    users, items = model.tables()
    r = run_cli(
        "recommend", "--data", tiny_data, "--run", run, "--device", "cpu", "--domain", "music", "--json",
        "--user", ids.user_ids(data)[0], "--top", "5",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["model"] == "HeroGraph"
    lo = data.item_offsets[2]
    scores = users[0] @ items.T
    seen = data.train_item[(data.train_user == 0) & (data.train_domain == 2)] - lo
    scores[seen] = -torch.inf
    want_items = torch.argsort(-scores, stable=True)[:5]
    assert [x["score"] for x in got["items"]] == pytest.approx(scores[want_items].tolist(), abs=1e-5)
    # export: the concatenated tables whose dot products are the scores
    out = tmp_path / "e.safetensors"
    r = run_cli(
        "export", "--data", tiny_data, "--run", run, "--format", "safetensors", "--out", out, "--domain", "music"
    )
    assert r.exit_code == 0, r.output
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["uclr_export"])["model"] == "HeroGraph"
        assert torch.equal(f.get_tensor("users.music"), users) and torch.equal(f.get_tensor("items.music"), items)
    r = run_cli(
        "-q", "baseline", "herograph", "--data", tiny_data, "--run", run, *ARGS, "--domain", "music", "--resume"
    )
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "args, text",
    [
        (["--neighbours", "0"], "neighbours"),
        (["--steps", "0"], "steps"),
        (["--walk-length", "5"], "No such option"),
        (["--domain", "games"], "unknown domain 'games'"),
        (["--dim", "1000000000"], "needs at least"),  # refused before any work
    ],
)
def test_cli_bad_input_is_one_line(tiny_data, tmp_path, args, text):
    r = run_cli("baseline", "herograph", "--data", tiny_data, "--run", tmp_path / "r", *ARGS, *args)
    assert r.exit_code in (1, 2), r.output
    assert text in r.stderr and "Traceback" not in r.output
    if r.exit_code == 1:
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "seed-0").exists()


def test_help_says_it_is_reconstructed():
    r = run_cli("baseline", "herograph", "--help")
    assert r.exit_code == 0 and "reconstructed from the paper's description" in r.stdout
    assert "--neighbours" in r.stdout and "--steps" in r.stdout
