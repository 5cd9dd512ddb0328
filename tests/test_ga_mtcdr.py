"""GA-MTCDR (issue 14), interaction-only: walks, skip-gram and the joint model learn, are deterministic, resume bit
for bit, never read valid/test rows, refuse foreign checkpoints, and show up in the CLI, evaluate, recommend, export."""

from __future__ import annotations

import json
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
from uclr_cli.config import GaMtcdrConfig
from uclr_cli.data import ids
from uclr_cli.data.dataset import load_prepared
from uclr_cli.errors import CheckpointError, DataError
from uclr_cli.metrics import summarize
from uclr_cli.models.ga_mtcdr import GATarget, Graph, SkipGram, attention_mix, random_walks, window_pairs
from uclr_cli.stages import evaluate as ev
from uclr_cli.stages import ga_mtcdr as ga

CPU = torch.device("cpu")
FAST = dict(
    dim=16,
    walks_per_node=4,
    walk_length=10,
    window=3,
    sg_epochs=2,
    epochs=6,
    patience=3,
    lr=0.005,
    batch_size=1024,
    device="cpu",
)


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")


@pytest.fixture(scope="module")
def data(tiny_data):
    return load_prepared(tiny_data)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ga-mtcdr")
    return run, ga.run_seed(GaMtcdrConfig(**FAST), data, run, 0, data.domains)


# --------------------------------------------------------------------------- learning


def test_walk_vectors_and_model_beat_random_clearly(data, trained):
    run, results = trained
    walk, target = by_stage(results, ga.WALK), by_stage(results, ga.TARGET)
    assert set(walk) == set(target) == set(data.domains)
    for d in data.domains:
        floor = random_ndcg(data.valid[d])
        assert walk[d].best_score > 1.5 * floor, (d, walk[d].best_score)
        assert target[d].best_score > 2 * floor, (d, target[d].best_score)
        assert target[d].best_epoch >= 1
        # the checkpoint evaluate reads scores what the stage reported
        model = tr.load_baseline(run / "seed-0", "ga-mtcdr", data, d, CPU)
        assert tr.baseline_valid_score(model, data, d) == pytest.approx(target[d].best_score, abs=1e-6)
    # the joint run's seconds are shared by its target rows (a summary adding them shows the run's time once)
    assert len({r.seconds for r in target.values()}) == 1


def test_hand_made_two_groups(tmp_path):
    """Two groups of users with disjoint items: the walks never cross groups, the model ranks the held item first."""
    hand = two_groups()
    cfg = GaMtcdrConfig(**{**FAST, "walks_per_node": 10, "epochs": 12, "patience": 12, "lr": 0.01, "batch_size": 64})
    res = by_stage(ga.run_seed(cfg, hand, tmp_path, 0, ["b"]), ga.TARGET)["b"]
    model = tr.load_baseline(tmp_path / "seed-0", "ga-mtcdr", hand, "b", CPU)
    v = hand.valid["b"]
    ranks = tr.rank_model(model, v.users, v.pos, v.negs)
    assert (ranks == 1).float().mean() >= 0.95, ranks.tolist()
    assert res.best_score >= 0.95


# --------------------------------------------------------------------------- the building blocks


def test_walks_follow_edges_and_window_pairs_are_the_known_ones():
    # users 0, 1, 2; items 3, 4 (local 0, 1); edges 0-3, 1-3, 1-4; user 2 has none
    g = Graph(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 1, 0]), 3, 2)  # (0, 0) twice: one edge
    assert g.degree.tolist() == [1, 2, 0, 2, 1] and g.nodes_with_edges().tolist() == [0, 1, 3, 4]
    edges = {(0, 3), (3, 0), (1, 3), (3, 1), (1, 4), (4, 1)}
    gen = torch.Generator().manual_seed(0)
    walks = random_walks(g, torch.tensor([0, 1, 3, 4] * 50), 12, gen)
    assert walks.shape == (200, 12) and walks[:, 0].tolist() == [0, 1, 3, 4] * 50
    steps = set(zip(walks[:, :-1].reshape(-1).tolist(), walks[:, 1:].reshape(-1).tolist()))
    assert steps == edges  # every edge taken, nothing else (user 2 is never reached)
    # from node 1 both neighbours come up about equally often
    first = walks[walks[:, 0] == 1, 1]
    assert 15 <= int((first == 3).sum()) <= 35
    # window 1: every neighbour pair, both ways; window 2 adds distance-2 pairs only for centres that draw b = 2
    w = torch.tensor([[5, 6, 7]])
    c, o = window_pairs(w, 1, gen)
    assert sorted(zip(c.tolist(), o.tolist())) == [(5, 6), (6, 5), (6, 7), (7, 6)]
    c, o = window_pairs(torch.arange(1000).reshape(1, -1), 2, gen)
    far = (c - o).abs() == 2
    assert set((c - o).abs().tolist()) == {1, 2} and 0.2 < far.float().mean() < 0.45  # E = (1/2) / (1 + 1/2)


def test_skip_gram_step_is_sgd_on_the_sgns_loss():
    gen = torch.Generator().manual_seed(1)
    sg = SkipGram(6, 4, torch.tensor([1, 2, 3, 1, 1, 2]), gen)
    sg.out.normal_(generator=gen)
    c, o, n = torch.tensor([0, 2, 2]), torch.tensor([3, 4, 3]), torch.tensor([[1, 5], [0, 1], [5, 5]])
    inp, out = sg.inp.clone().requires_grad_(), sg.out.clone().requires_grad_()
    sp = (inp[c] * out[o]).sum(1)
    sn = (inp[c].unsqueeze(1) * out[n]).sum(2)
    want = torch.nn.functional.softplus(-sp).sum() + torch.nn.functional.softplus(sn).sum()
    want.backward()
    loss = sg.step(c, o, n, lr=0.1)
    assert torch.isclose(loss, want.detach())
    assert torch.allclose(sg.inp, inp.detach() - 0.1 * inp.grad, atol=1e-6)
    assert torch.allclose(sg.out, out.detach() - 0.1 * out.grad, atol=1e-6)
    # negatives follow degree^0.75: node 2 (degree 3) is drawn most
    draws = sg.negatives((20000,), gen)
    share = torch.bincount(draws, minlength=6).double() / 20000
    w = torch.tensor([1, 2, 3, 1, 1, 2], dtype=torch.float64) ** 0.75
    assert torch.allclose(share, w / w.sum(), atol=0.015)


def test_attention_starts_as_the_mean_and_skips_domains_without_train_rows():
    x = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]]])  # (B=1, N=3, K=2)
    theta = torch.zeros(1, 3, 2)
    both = torch.tensor([[True, True, False]])
    assert torch.allclose(attention_mix(x, theta, both), torch.tensor([[2.0, 4.0]]))  # mean of the first two
    theta[0, 1, 0] = 50.0  # element-wise: the first coordinate now comes from domain 1 only
    assert torch.allclose(attention_mix(x, theta, both), torch.tensor([[3.0, 4.0]]))
    assert torch.equal(attention_mix(x, theta, torch.zeros(1, 3, dtype=torch.bool)), torch.zeros(1, 2))


def test_target_model_shapes_and_cosine_tables():
    gen = torch.Generator().manual_seed(0)
    m = GATarget(5, 7, 10, 4, n_domains=3, gen=gen)
    widths = [(lin.in_features, lin.out_features) for lin in m.user_tower if isinstance(lin, torch.nn.Linear)]
    assert widths == [(4, 8), (8, 16), (16, 32), (32, 16), (16, 8), (8, 4)]  # [K, 2K, 4K, 8K, 4K, 2K, K]
    assert m.theta.shape == (5, 3, 4) and m.user_proj.shape == (3, 4, 4) and torch.all(m.theta == 0)
    with torch.no_grad():
        m.user_nodes.normal_(generator=gen)
        m.item_nodes.normal_(generator=gen)
        m.has.fill_(True)
        m.has[0, 2] = False
    users, items = m.tables()
    assert users.shape == (5, 4) and items.shape == (7, 4)
    cos = torch.nn.functional.cosine_similarity(m.user_vectors(torch.tensor([1])), m.item_vectors(torch.tensor([3])))
    assert torch.isclose(users[1] @ items[3], cos[0], atol=1e-6)
    before = m.user_vectors(torch.arange(5))
    with torch.no_grad():
        m.user_nodes[0, 2] += 100.0  # a domain user 2 has no train rows in: not read
    assert torch.equal(before[2], m.user_vectors(torch.arange(5))[2])
    # the loss: a positive and a negative, labels 1 and 0
    loss = m.objective(torch.tensor([0, 1]), torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1.0, 0.0]] * 2), 0.0)
    assert loss.ndim == 0 and torch.isfinite(loss)


# --------------------------------------------------------------------------- no leakage


def test_graph_and_walks_hold_train_edges_only(data):
    for d in range(len(data.domains)):
        lo = data.item_offsets[d]
        g = ga.domain_graph(data, d, CPU)
        sel = data.train_domain == d
        train = set(zip(data.train_user[sel].tolist(), (data.train_item[sel] - lo + data.n_users).tolist()))
        walks = random_walks(g, g.nodes_with_edges().repeat(3), 8, torch.Generator().manual_seed(d))
        a, b = walks[:, :-1].reshape(-1), walks[:, 1:].reshape(-1)
        steps = {(int(x), int(y)) if x < y else (int(y), int(x)) for x, y in zip(a, b)}
        assert steps <= train
        name = data.domains[d]
        held = {
            (int(u), int(p) - lo + data.n_users)
            for s in (data.valid[name], data.test[name])
            for u, p in zip(s.users, s.pos)
        }
        assert held  # there is something to leak
        assert not steps & held


def test_stages_trained_the_same_whatever_the_held_out_positives(data, tmp_path):
    """With one epoch there is nothing to select: valid/test positives shuffled give the same tensors."""
    cfg = GaMtcdrConfig(**{**FAST, "sg_epochs": 1, "epochs": 1})
    shuffled = load_prepared(data.path)
    for d in data.domains:
        shuffled.valid[d].pos = shuffled.valid[d].pos.flip(0)
        shuffled.test[d].pos = shuffled.test[d].pos.flip(0)
    ga.run_seed(cfg, data, tmp_path / "a", 0, data.domains)
    ga.run_seed(cfg, shuffled, tmp_path / "b", 0, data.domains)
    for d in data.domains:
        for kind in ("ga-mtcdr-walk", "ga-mtcdr"):
            name = layout.baseline_name(kind, d)
            ta, tb = load_file(str(tmp_path / "a" / "seed-0" / name)), load_file(str(tmp_path / "b" / "seed-0" / name))
            assert all(torch.equal(ta[k], tb[k]) for k in ta), name


# --------------------------------------------------------------------------- determinism, resume, refusal


def test_same_seed_bit_identical_other_seed_differs(data, trained, tmp_path):
    run, _ = trained
    ga.run_seed(GaMtcdrConfig(**FAST), data, tmp_path / "b", 0, data.domains)
    ga.run_seed(GaMtcdrConfig(**{**FAST, "epochs": 1}), data, tmp_path / "c", 1, data.domains)
    for name in (layout.baseline_name("ga-mtcdr-walk", "books"), layout.baseline_name("ga-mtcdr", "books")):
        a, b = load_file(str(run / "seed-0" / name)), load_file(str(tmp_path / "b" / "seed-0" / name))
        c = load_file(str(tmp_path / "c" / "seed-1" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point()), name


@pytest.mark.parametrize("stage", ["walk", "joint"])
def test_kill_and_resume_bit_identical(data, trained, tmp_path, stage):
    run, _ = trained
    cfg = GaMtcdrConfig(**{**FAST, "sg_epochs": 3, "epochs": 3, "patience": 10})
    dom = data.domains[1]
    if stage == "walk":
        names = [layout.baseline_name("ga-mtcdr-walk", dom)]
    else:  # from the module's graph embeddings
        names = [layout.baseline_name("ga-mtcdr", d) for d in data.domains] + [layout.GA_MTCDR_JOINT]
        for r in ("ref", "cut"):
            layout.seed_dir(tmp_path / r, 0).mkdir(parents=True)
            for d in data.domains:
                shutil.copy(layout.seed_dir(run, 0) / layout.baseline_name("ga-mtcdr-walk", d), tmp_path / r / "seed-0")

    def train(run_, progress, resume):
        if stage == "walk":
            ga.run_walks(cfg, data, run_, 0, dom, resume=resume, progress=progress)
        else:
            ga.run_joint(cfg, data, run_, 0, data.domains, resume=resume, progress=progress)

    files = [n for n in names if n != layout.GA_MTCDR_JOINT] + [layout.resume_name(n) for n in names[-1:]]
    kill_and_resume(train, tmp_path / "ref", tmp_path / "cut", files)


@pytest.mark.slow  # ~17 s on 2 busy cores: three child processes; the in-process kill above runs by default
def test_sigkill_in_the_joint_stage_then_resume_equals_an_unbroken_run(tiny_data, tmp_path):
    """A real SIGKILL of `uclr baseline ga-mtcdr` once the joint stage has saved an epoch; `--resume` finishes it
    with the tensors of an unbroken run (both in child processes, one thread each)."""
    args = ["baseline", "ga-mtcdr", "--data", tiny_data, "--dim", "8", "--walks-per-node", "2", "--walk-length", "6"]
    args += ["--window", "2", "--epochs", "4", "--patience", "10", "--batch-size", "1024", "--device", "cpu"]
    ref = uclr_process(*args, "--run", tmp_path / "ref", cwd=tmp_path)
    cut = tmp_path / "cut"
    p = uclr_process(*args, "--run", cut, cwd=tmp_path)
    state = cut / "seed-0" / layout.resume_name(layout.GA_MTCDR_JOINT)
    wait_for(lambda: state.exists() or p.poll() is not None)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert state.exists() and not ckpt.read_header(state)["done"], "the kill came too late; make the run longer"
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    p = uclr_process(*args, "--run", cut, "--resume", cwd=tmp_path)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    names = [layout.baseline_name(k, d) for k in ("ga-mtcdr-walk", "ga-mtcdr") for d in ("books", "movies", "music")]
    for name in [*names, layout.resume_name(layout.GA_MTCDR_JOINT)]:
        assert same_tensors(tmp_path / "ref" / "seed-0" / name, cut / "seed-0" / name), name


def test_load_refuses_other_stage_dataset_and_walks(data, trained, tmp_path):
    run, _ = trained
    sd = tmp_path / "seed-0"
    sd.mkdir()
    path = run / "seed-0" / layout.baseline_name("ga-mtcdr", "books")
    shutil.copy(path, sd / layout.baseline_name("cat-art", "books"))
    with pytest.raises(CheckpointError, match="stage 'baseline-ga-mtcdr', expected 'baseline-cat-art'"):
        tr.load_baseline(sd, "cat-art", data, "books", CPU)
    shutil.copy(path, sd / layout.baseline_name("ga-mtcdr", "music"))
    with pytest.raises(CheckpointError, match="domain='books', expected 'music'"):
        tr.load_baseline(sd, "ga-mtcdr", data, "music", CPU)
    with pytest.raises(CheckpointError, match="another dataset"):
        ckpt.load(path, stage=ga.TARGET, fingerprint="0" * 64)
    meta = {k: v for k, v in ckpt.read_header(path).items() if k not in ("format_version", "package_version")}
    t = load_file(str(path))
    t["theta"] = t["theta"][..., :8]
    ckpt.save(sd / layout.baseline_name("ga-mtcdr", "books"), t, meta)
    with pytest.raises(CheckpointError, match="does not match"):
        tr.load_baseline(sd, "ga-mtcdr", data, "books", CPU)
    # the joint stage refuses to resume on other graph embeddings, and needs them
    other = tmp_path / "other"
    shutil.copytree(run, other)
    ga.run_walks(GaMtcdrConfig(**{**FAST, "sg_epochs": 1}), data, other, 0, "books")
    with pytest.raises(CheckpointError, match=r"other walk_sha256 \(books differ\)"):
        ga.run_joint(GaMtcdrConfig(**FAST), data, other, 0, data.domains, resume=True)
    with pytest.raises(DataError, match="missing"):
        ga.run_joint(GaMtcdrConfig(**FAST), data, tmp_path / "empty", 0, data.domains)
    with pytest.raises(CheckpointError, match="expected 8"):  # graph embeddings of another size
        ga.run_joint(GaMtcdrConfig(**{**FAST, "dim": 8}), data, run, 0, data.domains)


def test_resume_refuses_other_config(data, tmp_path):
    ga.run_walks(GaMtcdrConfig(**{**FAST, "sg_epochs": 1}), data, tmp_path, 0, "books")
    with pytest.raises(CheckpointError, match="other config"):
        ga.run_walks(GaMtcdrConfig(**{**FAST, "sg_epochs": 1, "window": 2}), data, tmp_path, 0, "books", resume=True)


# --------------------------------------------------------------------------- CLI, evaluate, recommend, export


ARGS = ["--dim", "8", "--walks-per-node", "2", "--walk-length", "6", "--window", "2", "--sg-epochs", "1"]
ARGS += ["--epochs", "2", "--batch-size", "512", "--device", "cpu"]


def test_cli_trains_and_evaluate_recommend_export_use_it(tiny_data, tmp_path):
    run = tmp_path / "r"
    r = run_cli("baseline", "ga-mtcdr", "--data", tiny_data, "--run", run, *ARGS, "--domain", "music")
    assert r.exit_code == 0, r.output
    assert "baseline-ga-mtcdr: best validation NDCG@10" in r.stdout
    assert (run / "seed-0" / layout.baseline_name("ga-mtcdr", "music")).is_file()
    assert not (run / "seed-0" / layout.baseline_name("ga-mtcdr", "books")).exists()
    assert (run / "seed-0" / layout.baseline_name("ga-mtcdr-walk", "books")).is_file()  # every domain is a source
    r = run_cli(
        "evaluate", "--data", tiny_data, "--run", run, "--device", "cpu", "--json", "--k", "10", "--by-activity"
    )
    assert r.exit_code == 0, r.output
    rep = ev.EvalReport.model_validate_json(r.stdout)
    rows = [x for x in rep.rows if x.model == "GA-MTCDR"]
    assert {x.domain for x in rows} == {"music"} and {x.bucket for x in rows} > {"all"}
    data = load_prepared(tiny_data)
    model = tr.load_baseline(run / "seed-0", "ga-mtcdr", data, "music", CPU)
    t = data.test["music"]
    want = 100 * summarize(tr.rank_model(model, t.users, t.pos, t.negs), [10])[("ndcg", 10)]
    (row,) = [x for x in rows if x.bucket == "all" and x.metric == "ndcg" and x.k == 10]
    assert row.mean == pytest.approx(want, abs=1e-9)
    models = [x.model for x in rep.rows if x.domain == "music" and x.bucket == "all" and x.metric == "ndcg"]
    assert models == ["Random", "Pop", "GA-MTCDR"]
    # recommend: the top items by cosine, train items left out
    users, items = model.tables()
    r = run_cli(
        "recommend", "--data", tiny_data, "--run", run, "--device", "cpu", "--domain", "music", "--json",
        "--user", ids.user_ids(data)[0], "--top", "5",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["model"] == "GA-MTCDR"
    lo = data.item_offsets[2]
    scores = users[0] @ items.T
    seen = data.train_item[(data.train_user == 0) & (data.train_domain == 2)] - lo
    scores[seen] = -torch.inf
    want_items = torch.argsort(-scores, stable=True)[:5]
    assert [x["score"] for x in got["items"]] == pytest.approx(scores[want_items].tolist(), abs=1e-6)
    # export: the unit vectors whose dot products are the scores
    out = tmp_path / "e.safetensors"
    r = run_cli(
        "export", "--data", tiny_data, "--run", run, "--format", "safetensors", "--out", out, "--domain", "music"
    )
    assert r.exit_code == 0, r.output
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["uclr_export"])["model"] == "GA-MTCDR"
        assert torch.equal(f.get_tensor("users.music"), users) and torch.equal(f.get_tensor("items.music"), items)
    r = run_cli("-q", "baseline", "ga-mtcdr", "--data", tiny_data, "--run", run, *ARGS, "--domain", "music", "--resume")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "args, text",
    [
        (["--walk-length", "1"], "walk_length"),
        (["--window", "0"], "window"),
        (["--layers", "2"], "No such option"),
        (["--domain", "games"], "unknown domain 'games'"),
        (["--dim", "1000000"], "needs at least"),  # towers of 84 K^2 weights: refused before any work
    ],
)
def test_cli_bad_input_is_one_line(tiny_data, tmp_path, args, text):
    r = run_cli("baseline", "ga-mtcdr", "--data", tiny_data, "--run", tmp_path / "r", *ARGS, *args)
    assert r.exit_code in (1, 2), r.output
    assert text in r.stderr and "Traceback" not in r.output
    if r.exit_code == 1:
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_help_labels_the_interaction_only_variant():
    r = run_cli("baseline", "ga-mtcdr", "--help")
    assert r.exit_code == 0 and "interaction-only" in r.stdout and "--walks-per-node" in r.stdout
