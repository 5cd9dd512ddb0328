"""Single-domain baselines (BPRMF, NeuMF, LightGCN): one behaviour suite run against every model.

Learning on a case with a known answer, save/load round trips, batch scores
equal to one-at-a-time scores, determinism by seed, resume equal to an
unbroken run, the CLI and the evaluate rows (docs/design.md §6, the paper's Table 2).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from conftest import run_cli
from uclr_cli import checkpoint as ckpt
from uclr_cli import layout, registry
from uclr_cli import trained as tr
from uclr_cli.config import BaselineConfig
from uclr_cli.data.dataset import Dataset, EvalSplit, load_prepared
from uclr_cli.errors import CheckpointError, ConfigError, DataError
from uclr_cli.metrics import positive_ranks, summarize
from uclr_cli.models.baselines import BPRMF, LightGCN, NeuMF, normalized_graph
from uclr_cli.stages import baseline as bl
from uclr_cli.stages import evaluate as ev

NAMES = ["bprmf", "neumf", "lightgcn"]
DOMAIN = "music"
#: small, fast settings per model that learn the tiny data within a few epochs
FAST = {
    "bprmf": dict(dim=16, batch_size=128, lr=0.05, epochs=8, patience=3, device="cpu"),
    "neumf": dict(dim=16, batch_size=256, lr=0.01, epochs=8, patience=3, device="cpu", mlp_layers=[16, 8]),
    "lightgcn": dict(dim=16, batch_size=256, lr=0.02, epochs=8, patience=3, device="cpu", layers=2),
}
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")


@pytest.fixture(scope="module")
def data(tiny_data):
    return load_prepared(tiny_data)


def config(name: str, **over) -> BaselineConfig:
    return BaselineConfig(model=name, **{**FAST[name], **over})


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """Each baseline trained once on DOMAIN (seed 0): {name: (run folder, result)}."""
    out = {}
    for name in NAMES:
        run = tmp_path_factory.mktemp(f"bl-{name}")
        out[name] = (run, bl.run_domain(config(name), data, run, 0, DOMAIN))
    return out


def random_ndcg(split: EvalSplit, k: int = 10) -> float:
    """Expected NDCG@k of a random scorer: the positive's rank is uniform over 1..N+1."""
    n = split.negs.shape[1] + 1
    return sum(1 / math.log2(r + 1) for r in range(1, k + 1)) / n


# --------------------------------------------------------------------------- learning


@pytest.mark.parametrize("name", NAMES)
def test_learns_tiny_data_beats_random(data, trained, name):
    run, res = trained[name]
    floor = random_ndcg(data.valid[DOMAIN])  # 0.0455 for 1 positive among 100
    assert res.best_epoch >= 1 and set(res.per_domain) == {DOMAIN}
    assert res.best_score > 2.5 * floor, (name, res.best_score, floor)
    assert res.path == run / "seed-0" / layout.baseline_name(name, DOMAIN)


def two_groups() -> Dataset:
    """A hand-made case with an obvious answer, in the second domain (item ids 20..29).

    40 users in two groups: even users like items 20-24, odd users 25-29.
    Each user has 4 of the group's 5 items in train; valid asks for the fifth
    among the 5 items of the other group, so every right model ranks it first.
    """
    n_users, liked = 40, {0: list(range(20, 25)), 1: list(range(25, 30))}
    train, valid = [], []  # (user, item, domain), (user, positive, negatives)
    for u in range(n_users):
        held = liked[u % 2][(u // 2) % 5]
        train += [(u, i, 1) for i in liked[u % 2] if i != held]
        train.append((u, u % 20, 0))  # one interaction in the first domain
        valid.append((u, held, liked[1 - u % 2]))
    tu, ti, td = torch.tensor(train).T
    b = EvalSplit(
        torch.tensor([v[0] for v in valid]), torch.tensor([v[1] for v in valid]), torch.tensor([v[2] for v in valid])
    )
    empty = EvalSplit(
        torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros((0, 5), dtype=torch.int64)
    )
    counts = torch.zeros(2, n_users, dtype=torch.int64).index_put_((td, tu), torch.ones_like(tu), accumulate=True)
    return Dataset(
        path=Path("hand-made"),
        manifest={"name": "groups", "fingerprint": "f" * 64},
        n_users=n_users,
        n_items=30,
        domains=["a", "b"],
        item_offsets=[0, 20, 30],
        train_user=tu.contiguous(),
        train_item=ti.contiguous(),
        train_domain=td.contiguous(),
        train_counts=counts,
        valid={"a": empty, "b": b},
        test={"a": empty, "b": b},
    )


@pytest.mark.parametrize("name", NAMES)
def test_hand_made_two_groups(name, tmp_path):
    hand = two_groups()
    cfg = config(
        name, batch_size=32, epochs=30, patience=30, lr=0.05, **({"mlp_layers": [8]} if name == "neumf" else {})
    )
    res = bl.run_domain(cfg, hand, tmp_path, 0, "b")
    model = tr.load_baseline(tmp_path / "seed-0", name, hand, "b", CPU)
    ev_b = hand.valid["b"]
    ranks = tr.rank_model(model, ev_b.users, ev_b.pos, ev_b.negs)
    assert (ranks == 1).float().mean() >= 0.95, (name, ranks.tolist())
    assert res.best_score >= 0.95


# --------------------------------------------------------------------------- save, load, scoring


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(data, trained, name, tmp_path):
    run, res = trained[name]
    model = tr.load_baseline(run / "seed-0", name, data, DOMAIN, CPU)
    # the score recorded while training equals the score of the reloaded checkpoint
    assert tr.baseline_valid_score(model, data, DOMAIN) == res.best_score
    meta = ckpt.read_header(res.path)
    assert meta["stage"] == f"baseline-{name}" and meta["dataset"] == data.fingerprint and meta["seed"] == 0
    assert (
        meta["domain"] == DOMAIN
        and meta["dim"] == 16
        and meta["epoch"] == res.best_epoch
        and meta["config"]["model"] == name
    )
    # save what was loaded under another folder, reload: identical scores
    copy = tmp_path / "seed-0" / layout.baseline_name(name, DOMAIN)
    ckpt.save(copy, model.tensors(), {k: v for k, v in meta.items() if k not in ("format_version", "package_version")})
    again = tr.load_baseline(tmp_path / "seed-0", name, data, DOMAIN, CPU)
    ev_m = data.test[DOMAIN]
    cand = torch.cat([ev_m.pos.unsqueeze(1), ev_m.negs], 1)
    assert torch.equal(model.score(ev_m.users, cand), again.score(ev_m.users, cand))
    assert all(torch.equal(a, b) for a, b in zip(model.tensors().values(), again.tensors().values()))


@pytest.mark.parametrize("name", NAMES)
def test_load_refuses_other_stage_dataset_domain_and_shape(data, trained, name, tmp_path):
    run, res = trained[name]
    sd = tmp_path / "seed-0"
    sd.mkdir()
    other = "bprmf" if name != "bprmf" else "lightgcn"
    shutil.copy(res.path, sd / layout.baseline_name(other, DOMAIN))
    with pytest.raises(CheckpointError, match=f"stage 'baseline-{name}', expected 'baseline-{other}'"):
        tr.load_baseline(sd, other, data, DOMAIN, CPU)
    shutil.copy(res.path, sd / layout.baseline_name(name, "books"))
    with pytest.raises(CheckpointError, match="domain='music', expected 'books'"):
        tr.load_baseline(sd, name, data, "books", CPU)
    with pytest.raises(CheckpointError, match="another dataset"):
        ckpt.load(res.path, stage=f"baseline-{name}", fingerprint="0" * 64)
    # tensors of another dimension under the right header
    meta = {k: v for k, v in ckpt.read_header(res.path).items() if k not in ("format_version", "package_version")}
    t = {k: v[..., :8] if v.dim() == 2 and v.shape[1] >= 16 else v for k, v in load_file(str(res.path)).items()}
    ckpt.save(sd / layout.baseline_name(name, DOMAIN), t, meta)
    with pytest.raises(CheckpointError, match="does not match"):
        tr.load_baseline(sd, name, data, DOMAIN, CPU)


@pytest.mark.parametrize("name", NAMES)
def test_batch_scores_equal_one_at_a_time(data, trained, name):
    run, _ = trained[name]
    model = tr.load_baseline(run / "seed-0", name, data, DOMAIN, CPU)
    ev_m = data.test[DOMAIN]
    cand = torch.cat([ev_m.pos.unsqueeze(1), ev_m.negs], 1)
    batch = model.score(ev_m.users, cand)
    single = torch.cat([model.score(ev_m.users[r : r + 1], cand[r : r + 1]) for r in range(len(ev_m.users))])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-6)
    # ranks: the evaluator's path (dot product or chunked scorer) == ranks of the scores == one row at a time
    ranks = tr.rank_model(model, ev_m.users, ev_m.pos, ev_m.negs)
    assert torch.equal(ranks, positive_ranks(batch[:, 0], batch[:, 1:]))
    assert torch.equal(ranks, tr.rank_model(model, ev_m.users, ev_m.pos, ev_m.negs, chunk=1))
    assert torch.equal(ranks, tr.rank_model(model, ev_m.users, ev_m.pos, ev_m.negs, chunk=7))


def test_candidates_outside_the_domain_refused(data, trained):
    run, _ = trained["bprmf"]
    model = tr.load_baseline(run / "seed-0", "bprmf", data, DOMAIN, CPU)
    books = data.test["books"]
    with pytest.raises(DataError, match="outside the model's domain"):
        tr.rank_model(model, books.users, books.pos, books.negs)


# --------------------------------------------------------------------------- determinism and resume


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_bit_identical_other_seed_differs(data, name, tmp_path):
    cfg = config(name, epochs=2)
    paths = [bl.run_domain(cfg, data, tmp_path / n, s, DOMAIN).path for n, s in (("a", 0), ("b", 0), ("c", 1))]
    a, b, c = (load_file(str(p)) for p in paths)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


class Killed(Exception):
    pass


def stop_then_resume(cfg: BaselineConfig, data, run: Path, stop_stage: str, stop_epoch: int) -> None:
    """Stop the run right after ``stop_stage``'s epoch ``stop_epoch`` was checkpointed, then resume it.

    The progress callback runs after the epoch's resume state is written, so
    raising there is a kill at an epoch boundary (test_training.py's SIGKILL
    test covers kills at any time with the shared checkpoint code).
    """

    def kill(e):
        if e.stage == f"{stop_stage} {DOMAIN}" and e.epoch == stop_epoch:
            raise Killed

    with pytest.raises(Killed):
        bl.run_domain(cfg, data, run, 0, DOMAIN, progress=kill)
    state = run / "seed-0" / layout.resume_name(layout.baseline_name(stop_stage.removeprefix("baseline-"), DOMAIN))
    assert ckpt.read_header(state)["epoch"] == stop_epoch and not ckpt.read_header(state)["done"]
    bl.run_domain(cfg, data, run, 0, DOMAIN, resume=True)


@pytest.mark.parametrize("name", NAMES)
def test_resume_equals_uninterrupted(data, name, tmp_path):
    full = config(name, epochs=4, patience=10)
    bl.run_domain(full, data, tmp_path / "a", 0, DOMAIN)
    stop_then_resume(full, data, tmp_path / "b", f"baseline-{name}", 2)
    for p in (layout.baseline_name(name, DOMAIN), layout.resume_name(layout.baseline_name(name, DOMAIN))):
        a, b = load_file(str(tmp_path / "a" / "seed-0" / p)), load_file(str(tmp_path / "b" / "seed-0" / p))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), p
    ha = ckpt.read_header(tmp_path / "a" / "seed-0" / layout.baseline_name(name, DOMAIN))
    hb = ckpt.read_header(tmp_path / "b" / "seed-0" / layout.baseline_name(name, DOMAIN))
    assert (ha["epoch"], ha["best_score"]) == (hb["epoch"], hb["best_score"])


def test_resume_refuses_other_config(data, tmp_path):
    bl.run_domain(config("lightgcn", epochs=1), data, tmp_path, 0, DOMAIN)
    with pytest.raises(CheckpointError, match="other config"):
        bl.run_domain(config("lightgcn", epochs=1, layers=3), data, tmp_path, 0, DOMAIN, resume=True)


def test_neumf_pretrained_towers_and_resume(data, tmp_path):
    full = config("neumf", epochs=4, patience=10, pretrain_towers=True)
    res = bl.run_domain(full, data, tmp_path / "a", 0, DOMAIN)
    sd = tmp_path / "a" / "seed-0"
    for t in ("gmf", "mlp", "neumf"):
        assert (sd / layout.baseline_name(t, DOMAIN)).is_file(), t
    assert set(ckpt.read_header(res.path)["towers_sha256"]) == {"gmf", "mlp"}
    for stop in ("baseline-mlp", "baseline-neumf"):  # killed while pretraining a tower, and after the towers
        run = tmp_path / stop
        stop_then_resume(full, data, run, stop, 2)
        a, b = load_file(str(res.path)), load_file(str(run / "seed-0" / layout.baseline_name("neumf", DOMAIN)))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- building blocks with exact answers


def test_normalized_graph_matches_dense():
    users, items = torch.tensor([0, 0, 1, 2, 2, 0]), torch.tensor([0, 1, 1, 2, 0, 0])  # (0,0) twice: one edge
    g = normalized_graph(users, items, n_users=4, n_items=3)  # user 3 has no edge
    a = torch.zeros(7, 7)
    for u, i in {(0, 0), (0, 1), (1, 1), (2, 2), (2, 0)}:
        a[u, 4 + i] = a[4 + i, u] = 1.0
    deg = a.sum(1)
    dinv = torch.where(deg > 0, deg.clamp(min=1).rsqrt(), torch.zeros_like(deg))
    torch.testing.assert_close(g.to_dense(), dinv[:, None] * a * dinv[None, :])
    assert g.layout == torch.sparse_csr


def test_lightgcn_propagation_and_gradient_match_dense():
    users, items = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 2])
    g = normalized_graph(users, items, 3, 3)
    model = LightGCN(3, 3, 10, 4, layers=2, graph=g, gen=torch.Generator().manual_seed(0))
    dense = g.to_dense()
    x = torch.cat([model.user_emb, model.item_emb])
    expect = (x + dense @ x + dense @ (dense @ x)) / 3
    u, i = model.propagate()
    torch.testing.assert_close(torch.cat([u, i]), expect)
    (u.sum() + 2 * i.sum()).backward()
    x2 = x.detach().clone().requires_grad_(True)
    e2 = (x2 + dense @ x2 + dense @ (dense @ x2)) / 3
    (e2[:3].sum() + 2 * e2[3:].sum()).backward()
    torch.testing.assert_close(torch.cat([model.user_emb.grad, model.item_emb.grad]), x2.grad)
    flat = LightGCN(3, 3, 10, 4, layers=0, graph=g, gen=torch.Generator().manual_seed(0))
    assert torch.equal(flat.tables()[0], flat.user_emb.detach())  # K = 0: plain MF


def test_neumf_from_towers_is_half_gmf_half_mlp():
    gen = torch.Generator().manual_seed(0)
    gmf = NeuMF(5, 6, 100, 4, [6, 3], kind="gmf", gen=gen)
    mlp = NeuMF(5, 6, 100, 4, [6, 3], kind="mlp", gen=gen)
    fused = NeuMF(5, 6, 100, 4, [6, 3], kind="neumf", gen=gen)
    fused.init_from_towers(gmf, mlp, alpha=0.5)
    users, items = torch.tensor([0, 1, 4, 4]), torch.tensor([100, 105, 103, 100])
    with torch.no_grad():
        expect = 0.5 * gmf(users, items)[0] + 0.5 * mlp(users, items)[0]
        torch.testing.assert_close(fused(users, items)[0], expect)
    # the scorer (first MLP layer split per user and item) agrees with the training forward
    torch.testing.assert_close(fused.score(users, items.unsqueeze(1)).squeeze(1), fused(users, items)[0].detach())
    assert set(fused.embedding_names()) == {"gmf_user", "gmf_item", "mlp_user", "mlp_item"}


def test_bprmf_scores_are_dot_products():
    m = BPRMF(3, 4, 7, 5, gen=torch.Generator().manual_seed(0))
    items = torch.tensor([[7, 10], [8, 9], [10, 7]])
    got = m.score(torch.tensor([0, 1, 2]), items)
    u, it = m.tables()
    expect = torch.stack([u[r] @ it[items[r] - 7].T for r in range(3)])
    torch.testing.assert_close(got, expect)


# --------------------------------------------------------------------------- config, CLI, evaluate


def test_config_defaults_and_model_options():
    c = BaselineConfig()
    assert (c.dim, c.batch_size, c.lr, c.reg, c.epochs, c.patience, c.negatives, c.layers) == (
        128,
        2048,
        3e-3,
        0.03,
        100,
        10,
        "uniform",
        3,
    )
    # per-model defaults chosen on validation (docs/results.md); what the user gives wins
    assert (c.optimizer, c.item_bias) == ("rowwise-rmsprop", True)
    g = BaselineConfig(model="lightgcn")
    assert (g.lr, g.reg) == (3e-3, 1e-3)
    n = BaselineConfig(model="neumf")
    assert (n.lr, n.reg) == (1e-3, 1e-5)
    b = BaselineConfig(model="bprmf", lr=0.05, item_bias=False, optimizer="rowwise-adam")
    assert (b.lr, b.reg, b.item_bias, b.optimizer) == (0.05, 0.03, False, "rowwise-adam")
    assert [c.negatives_per_positive(k) for k in ("neumf", "gmf", "mlp", "bprmf", "lightgcn")] == [4, 4, 4, 1, 1]
    assert BaselineConfig(n_negatives=3).negatives_per_positive("neumf") == 3
    assert BaselineConfig(reg=0.1, reg_neg=0.0).role_regs() == (0.1, 0.1, 0.0)
    with pytest.raises(ValidationError, match="negatives is the sampler now"):  # the old NeuMF count
        BaselineConfig(model="neumf", negatives=4)
    with pytest.raises(ValidationError, match="pop_share applies to --negatives mix"):
        BaselineConfig(pop_share=0.2)
    for key, value in (("item_bias", True), ("optimizer", "rowwise-sgd"), ("reg_user", 0.1)):
        with pytest.raises(ValidationError, match=f"{key} applies to bprmf"):
            BaselineConfig(model="neumf", **{key: value})
    with pytest.raises(ValidationError, match="learning_rate"):
        BaselineConfig(learning_rate=0.1)
    with pytest.raises(ValidationError, match="layers applies to lightgcn"):
        BaselineConfig(model="bprmf", layers=2)
    # what a checkpoint records: the options that model reads
    assert "layers" not in bl.model_config(c, "bprmf") and bl.model_config(c, "gmf")["n_negatives"] == 4
    assert "item_bias" in bl.model_config(c, "bprmf") and "item_bias" not in bl.model_config(c, "lightgcn")
    assert bl.model_config(BaselineConfig(model="lightgcn"), "lightgcn")["layers"] == 3


def test_evaluate_constants_match_stage():
    assert tuple(registry.BASELINES.values()) == ("BPRMF", "NeuMF", "LightGCN", "CAT-ART", "GA-MTCDR", "HeroGraph")
    want = ("Random", "Pop", "BPRMF", "NeuMF", "LightGCN", "CAT-ART", "GA-MTCDR", "HeroGraph", "PGE")
    assert registry.MODEL_ORDER[:9] == want


@pytest.fixture(scope="module")
def cli_run(tiny_data, tmp_path_factory):
    """A run folder with PGE (all domains) and the three baselines on DOMAIN, through the CLI."""
    run = tmp_path_factory.mktemp("bl-cli") / "run"
    r = run_cli(
        "-q",
        "pretrain",
        "--data",
        tiny_data,
        "--run",
        run,
        "--dim",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "512",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    common = [
        "--data",
        tiny_data,
        "--run",
        run,
        "--domain",
        DOMAIN,
        "--dim",
        "16",
        "--epochs",
        "2",
        "--batch-size",
        "256",
        "--device",
        "cpu",
    ]
    r = run_cli("baseline", "neumf", *common, "--n-negatives", "2", "--mlp-layers", "16,8", "--lr", "0.01")
    assert r.exit_code == 0, r.output
    assert "baseline-neumf: best validation NDCG@10" in r.stdout
    for name, extra in (("bprmf", []), ("lightgcn", ["--layers", "2"])):
        r = run_cli("-q", "baseline", name, *common, *extra)
        assert r.exit_code == 0, r.output
    return run


def test_cli_writes_checkpoints_and_config(cli_run):
    sd = cli_run / "seed-0"
    for name in NAMES:
        assert (sd / layout.baseline_name(name, DOMAIN)).is_file()
        assert not (sd / layout.baseline_name(name, "books")).exists()
    resolved = json.loads((cli_run / "config.json").read_text())
    assert resolved["baseline-neumf"]["n_negatives"] == 2 and resolved["baseline-neumf"]["mlp_layers"] == [16, 8]
    assert resolved["baseline-lightgcn"]["layers"] == 2


@pytest.mark.parametrize(
    "args, code, text",
    [
        (
            ["baseline", "svd"],
            1,
            "unknown baseline 'svd'; choose one of bprmf, neumf, lightgcn, cat-art, ga-mtcdr, herograph",
        ),
        (["baseline", "bprmf", "--layers", "2"], 1, "layers applies to lightgcn only, not bprmf (--layers)"),
        (["baseline", "lightgcn", "--item-bias"], 1, "item_bias applies to bprmf only, not lightgcn (--item-bias)"),
        (["baseline", "bprmf", "--negatives", "3"], 1, "'uniform', 'popularity' or 'mix': negatives (--negatives)"),
        (["baseline", "neumf", "--mlp-layers", "8,0"], 1, "(--mlp-layers)"),
        (["baseline", "neumf", "--domain", "games", "--epochs", "1"], 1, "unknown domain 'games'"),
        (["baseline"], 2, "NAME"),
    ],
)
def test_cli_bad_input(tiny_data, tmp_path, args, code, text):
    r = run_cli(*args, "--data", tiny_data, "--run", tmp_path / "r")
    assert r.exit_code == code, r.output
    assert text in r.stderr
    if code == 1:
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_evaluate_shows_baselines_in_table_2_order(tiny_data, data, cli_run):
    r = run_cli("evaluate", "--data", tiny_data, "--run", cli_run, "--device", "cpu", "--json", "--k", "10")
    assert r.exit_code == 0, r.output
    rep = ev.EvalReport.model_validate_json(r.stdout)
    for d in data.domains:
        models = [x.model for x in rep.rows if x.domain == d and x.bucket == "all" and x.metric == "ndcg"]
        # a baseline trained for some domains only: rows only there
        assert models == (
            ["Random", "Pop", "BPRMF", "NeuMF", "LightGCN", "PGE"] if d == DOMAIN else ["Random", "Pop", "PGE"]
        )
    for x in rep.rows:
        if x.model in registry.BASELINES.values():
            assert x.n_seeds == 1 and 0.0 <= x.mean <= 100.0
            assert x.bucket == "all" or x.bucket in rep.buckets
    # the rows are the ranks of the reloaded models on the test candidates
    t = data.test[DOMAIN]
    for name in NAMES:  # the three trained here (CAT-ART: tests/test_cat_art.py)
        display = registry.BASELINES[name]
        model = tr.load_baseline(cli_run / "seed-0", name, data, DOMAIN, CPU)
        want = 100 * summarize(tr.rank_model(model, t.users, t.pos, t.negs), [10])[("ndcg", 10)]
        (row,) = [x for x in rep.rows if x.model == display and x.bucket == "all" and x.metric == "ndcg"]
        assert row.mean == pytest.approx(want, abs=1e-9)
    table = run_cli("evaluate", "--data", tiny_data, "--run", cli_run, "--device", "cpu", "--k", "10", "--by-activity")
    assert table.exit_code == 0, table.output
    out = table.stdout
    music = out[out.index(f"{DOMAIN} (") :]
    pos = [music.index(f" {m} ") for m in ("Random", "Pop", "BPRMF", "NeuMF", "LightGCN", "PGE")]
    assert pos == sorted(pos)
    assert "by activity" in out and out.count("LightGCN") >= 3  # the main table and activity buckets
    only = ev.run(data, cli_run, ks=(10,), device="cpu", variants=["NeuMF"])
    assert only.models == ["Random", "Pop", "NeuMF"]
    with pytest.raises(ConfigError, match="known: BPRMF, NeuMF, LightGCN, CAT-ART, GA-MTCDR, HeroGraph, PGE"):
        ev.run(data, cli_run, variants=["SVD"])
    assert not math.isnan(only.report.rows[0].mean)


# --------------------------------------------------------------------------- PGE's options on the baselines (issue 11)


@pytest.mark.parametrize(
    "optimizer, lr", [("rowwise-adam", 0.05), ("rowwise-rmsprop", 0.05), ("rowwise-adagrad", 0.5), ("rowwise-sgd", 5.0)]
)
def test_bprmf_every_optimizer_solves_two_groups(optimizer, lr, tmp_path):
    hand = two_groups()
    cfg = config("bprmf", batch_size=32, epochs=30, patience=30, lr=lr, optimizer=optimizer, item_bias=True)
    res = bl.run_domain(cfg, hand, tmp_path, 0, "b")
    assert res.best_score >= 0.95, (optimizer, res.best_score)


def test_bprmf_item_bias_is_a_fixed_user_column_and_learns_popularity(data, tmp_path):
    cfg = config("bprmf", item_bias=True, reg=0.01, epochs=6, patience=6)
    bl.run_domain(cfg, data, tmp_path, 0, DOMAIN)
    model = tr.load_baseline(tmp_path / "seed-0", "bprmf", data, DOMAIN, CPU)
    users, items = model.tables()
    assert users.shape[1] == items.shape[1] == 17  # dim + the bias column
    assert torch.equal(users[:, -1], torch.ones(data.n_users))  # never trained, never decayed
    d = data.domain_index(DOMAIN)
    lo = data.item_offsets[d]
    sel = data.train_domain == d
    counts = torch.bincount(data.train_item[sel] - lo, minlength=items.shape[0]).float()
    bias = items[:, -1]
    corr = torch.corrcoef(torch.stack([bias, counts]))[0, 1]
    assert corr > 0.5, float(corr)  # uniform negatives: the positives' bias rises, so bias follows popularity


def test_sampler_and_negative_count_reach_the_bprmf_step(data, tmp_path, monkeypatch):
    seen, sizes = [], []
    real_sampler, real_step = bl.NegativeSampler, bl.BPRRowStep.step

    def sampler(*a, **k):
        seen.append(a[2:])
        return real_sampler(*a, **k)

    def step(self, u, i, j):
        sizes.append((len(u), int(j.min()), int(j.max())))
        return real_step(self, u, i, j)

    monkeypatch.setattr(bl, "NegativeSampler", sampler)
    monkeypatch.setattr(bl.BPRRowStep, "step", step)
    cfg = config("bprmf", batch_size=64, epochs=1, negatives="mix", pop_share=0.25, n_negatives=3)
    bl.run_domain(cfg, data, tmp_path, 0, DOMAIN)
    d = data.domain_index(DOMAIN)
    n_items = data.item_offsets[d + 1] - data.item_offsets[d]
    assert seen == [("mix", 0.25)]
    assert sizes[0][0] == 3 * 64 and sum(s for s, _, _ in sizes) == 3 * int((data.train_domain == d).sum())
    assert all(0 <= lo_ and hi_ < n_items for _, lo_, hi_ in sizes)  # local ids of the domain


@pytest.mark.parametrize("name", NAMES)
def test_uniform_init_has_the_asked_std_and_bound(data, name):
    conf = bl.model_config(config(name, init="uniform", init_std=0.2), name)
    model = tr.build_baseline(name, conf, data, data.domain_index(DOMAIN), CPU, torch.Generator().manual_seed(0))
    tables = [v for k, v in model.tensors().items() if k.endswith(("user_emb", "user"))]  # neumf: gmf_/mlp_user
    assert tables
    for table in tables:
        table = table[:, :16]  # bprmf's item bias adds a column of ones to the user table
        assert table.abs().max() <= 0.2 * math.sqrt(3) + 1e-6
        assert abs(float(table.std()) - 0.2) < 0.01


def test_checkpoint_written_before_the_options_still_loads(data):
    """A bprmf checkpoint whose recorded config lacks init/item_bias (older uclr) builds as normal, no bias."""
    conf = {k: v for k, v in bl.model_config(config("bprmf"), "bprmf").items() if k not in ("init", "item_bias")}
    model = tr.build_baseline("bprmf", conf, data, data.domain_index(DOMAIN), CPU)
    assert model.tables()[0].shape[1] == FAST["bprmf"]["dim"] and not model.item_bias
