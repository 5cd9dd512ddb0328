"""CAT-ART (issue 14): the three stages learn, are deterministic, resume bit for bit, never read valid/test rows,
refuse foreign checkpoints, and show up in the CLI and `uclr evaluate`."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from test_baselines import random_ndcg, two_groups
from test_resume import kill_and_resume
from uclr_cli import checkpoint as ckpt
from uclr_cli import layout
from uclr_cli import trained as tr
from uclr_cli.config import CatArtConfig, GaMtcdrConfig, HeroGraphConfig, PrepareConfig
from uclr_cli.data.dataset import load_prepared
from uclr_cli.errors import CheckpointError, DataError
from uclr_cli.metrics import summarize
from uclr_cli.models.cat_art import ART, CatAutoEncoder, info_nce
from uclr_cli.stages import cat_art as ca
from uclr_cli.stages import evaluate as ev
from uclr_cli.stages import ga_mtcdr, herograph, prepare

CPU = torch.device("cpu")
FAST = dict(dim=16, batch_size=128, lr=0.01, epochs=8, patience=3, cat_epochs=3, cat_batch_size=64, device="cpu")


@pytest.fixture(scope="module")
def data(tiny_data):
    return load_prepared(tiny_data)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("cat-art")
    return run, ca.run_seed(CatArtConfig(**FAST), data, run, 0, data.domains)


def by_stage(results, stage):
    return {r.extra["domain"]: r for r in results if r.stage.split()[0] == stage}


# --------------------------------------------------------------------------- learning


def test_every_stage_learns_and_art_beats_random_clearly(data, trained):
    run, results = trained
    mf, art = by_stage(results, ca.MF), by_stage(results, ca.ART)
    assert set(mf) == set(art) == set(data.domains)
    for d in data.domains:
        floor = random_ndcg(data.valid[d])
        assert mf[d].best_score > 1.5 * floor, (d, mf[d].best_score)
        assert art[d].best_score > 2.5 * floor, (d, art[d].best_score)
    # the CAT's training loss went down: its best (negated loss) is after epoch 1
    (cat,) = [r for r in results if r.stage == ca.CAT]
    assert cat.best_epoch > 1


def test_hand_made_two_groups(tmp_path):
    hand = two_groups()
    cfg = CatArtConfig(**{**FAST, "batch_size": 32, "epochs": 30, "patience": 30, "lr": 0.05, "cat_epochs": 2})
    res = by_stage(ca.run_seed(cfg, hand, tmp_path, 0, ["b"]), ca.ART)["b"]
    model = tr.load_baseline(tmp_path / "seed-0", "cat-art", hand, "b", CPU)
    v = hand.valid["b"]
    ranks = tr.rank_model(model, v.users, v.pos, v.negs)
    assert (ranks == 1).float().mean() >= 0.95, ranks.tolist()
    assert res.best_score >= 0.95


# --------------------------------------------------------------------------- the modules


def test_shapes_augmentation_and_loss():
    gen = torch.Generator().manual_seed(0)
    cat = CatAutoEncoder(3, 4, gen)
    sizes = [m.weight.shape for m in cat.encoder if isinstance(m, torch.nn.Linear)]
    assert sizes == [(20, 12), (12, 20), (4, 12)]  # N·d -> 5d -> 3d -> d
    assert [m.weight.shape for m in cat.decoder if isinstance(m, torch.nn.Linear)] == [(12, 4), (20, 12), (12, 20)]
    with torch.no_grad():
        cat.pad.fill_(7.0)
    x = torch.randn(5, 12, generator=gen)
    which = torch.tensor([0, 1, 2, 0, 1])
    xa = cat.augment(x, which).reshape(5, 3, 4)
    for r, w in enumerate(which.tolist()):
        assert torch.all(xa[r, w] == 7.0)
        others = [b for b in range(3) if b != w]
        assert torch.equal(xa[r, others], x.reshape(5, 3, 4)[r, others])
    loss, parts = cat.loss(x, which, 0.1, (0.2, 0.4, 0.4))
    assert parts.shape == (3,) and torch.isclose(loss, (parts * torch.tensor([0.2, 0.4, 0.4])).sum())
    # InfoNCE: aligned views score lower than shuffled ones
    h = torch.randn(8, 4, generator=gen)
    assert info_nce(h, h, 0.1) < info_nce(h, h.roll(1, 0), 0.1)


def test_art_uses_the_pad_for_a_domain_without_train_rows():
    gen = torch.Generator().manual_seed(0)
    art = ART(4, 6, 10, 5, n_domains=3, target=1, dropout=0.0, gen=gen)
    with torch.no_grad():
        art.users.normal_(generator=gen)
        art.z.normal_(generator=gen)
        art.has.fill_(True)
        art.has[0, 2] = False  # user 2 has no train rows in source 0
    u = torch.arange(4)
    before = art.user_vectors(u)[0]
    with torch.no_grad():
        art.users[0, 2] += 100.0  # a row the model must not read
    after = art.user_vectors(u)[0]
    assert torch.equal(before[2], after[2])
    with torch.no_grad():
        art.users[0, 1] += 1.0  # a row it must read
    assert not torch.equal(after[1], art.user_vectors(u)[0][1])
    users, items = art.tables()
    assert users.shape == (4, 5) and items.shape == (6, 5)


def test_art_parts_sum_to_the_user_vector_and_a_target_cold_user_reads_the_pad():
    gen = torch.Generator().manual_seed(1)
    art = ART(4, 6, 10, 5, n_domains=3, target=1, dropout=0.0, gen=gen)
    with torch.no_grad():
        art.users.normal_(generator=gen)
        art.z.normal_(generator=gen)
        art.pad.normal_(generator=gen)
        art.has.fill_(True)
        art.has[1, 3] = False  # user 3 has no train rows in the target
    u = torch.arange(4)
    q, g, att = art.parts(u)
    assert torch.equal(q[3], art.pad) and torch.equal(q[0], art.users[1, 0])
    assert torch.equal(g, art.global_proj(art.z[u]))
    assert torch.equal(art.user_vectors(u)[0], q + g + att)
    one = ART(4, 6, 10, 5, n_domains=1, target=0, gen=gen)  # no source domain: no attention part
    q1, g1, att1 = one.parts(u)
    assert att1 is None and torch.equal(one.user_vectors(u)[0], q1 + g1)


# --------------------------------------------------------------------------- no leakage


def test_has_and_stage_1_read_train_rows_only(data, tmp_path):
    has = ca.has_train_rows(data, CPU)
    for d in range(len(data.domains)):
        sel = data.train_domain == d
        assert torch.equal(has[d].nonzero().squeeze(1), torch.unique(data.train_user[sel]))
    name = data.domains[0]
    # stage 1 trained the same whatever the valid/test positives are (only train rows feed it)
    cfg = CatArtConfig(**{**FAST, "epochs": 1})
    a = ca.run_mf(cfg, data, tmp_path / "a", 0, name)
    shuffled = load_prepared(data.path)
    shuffled.valid[name].pos = shuffled.valid[name].pos.flip(0)
    shuffled.test[name].pos = shuffled.test[name].pos.flip(0)
    b = ca.run_mf(cfg, shuffled, tmp_path / "b", 0, name)
    ta, tb = load_file(str(a.path)), load_file(str(b.path))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


# --------------------------------------------------------------------------- determinism, resume, refusal


def test_same_seed_bit_identical_other_seed_differs(data, trained, tmp_path):
    run, _ = trained
    ca.run_seed(CatArtConfig(**FAST), data, tmp_path / "b", 0, data.domains)
    ca.run_seed(CatArtConfig(**FAST), data, tmp_path / "c", 1, [data.domains[0]])
    for name in (
        layout.baseline_name("cat-art-mf", "books"),
        layout.CAT_ART_CAT,
        layout.baseline_name("cat-art", "books"),
    ):
        a, b = load_file(str(run / "seed-0" / name)), load_file(str(tmp_path / "b" / "seed-0" / name))
        c = load_file(str(tmp_path / "c" / "seed-1" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point()), name


@pytest.mark.parametrize("stage", ["mf", "cat", "art"])
def test_kill_and_resume_bit_identical(data, trained, tmp_path, stage):
    run, _ = trained
    cfg = CatArtConfig(**{**FAST, "epochs": 3, "patience": 10, "cat_epochs": 3, "cat_patience": 10})
    dom = data.domains[1]
    names = {
        "mf": layout.baseline_name("cat-art-mf", dom),
        "cat": layout.CAT_ART_CAT,
        "art": layout.baseline_name("cat-art", dom),
    }
    if stage != "mf":  # start from the module's stage 1 (and CAT for ART)
        keep = [layout.baseline_name("cat-art-mf", d) for d in data.domains]
        keep += [layout.CAT_ART_CAT] if stage == "art" else []
        for r in ("ref", "cut"):
            layout.seed_dir(tmp_path / r, 0).mkdir(parents=True)
            for k in keep:
                shutil.copy(layout.seed_dir(run, 0) / k, layout.seed_dir(tmp_path / r, 0))

    def train(run_, progress, resume):
        if stage == "mf":
            ca.run_mf(cfg, data, run_, 0, dom, resume=resume, progress=progress)
        elif stage == "cat":
            ca.run_cat(cfg, data, run_, 0, resume=resume, progress=progress)
        else:
            ca.run_art(cfg, data, run_, 0, dom, resume=resume, progress=progress)

    kill_and_resume(train, tmp_path / "ref", tmp_path / "cut", [names[stage], layout.resume_name(names[stage])])


def test_load_refuses_other_stage_dataset_source_and_shape(data, trained, tmp_path):
    run, _ = trained
    sd = tmp_path / "seed-0"
    sd.mkdir()
    art_path = run / "seed-0" / layout.baseline_name("cat-art", "books")
    shutil.copy(art_path, sd / layout.baseline_name("bprmf", "books"))
    with pytest.raises(CheckpointError, match="stage 'baseline-cat-art', expected 'baseline-bprmf'"):
        tr.load_baseline(sd, "bprmf", data, "books", CPU)
    shutil.copy(art_path, sd / layout.baseline_name("cat-art", "music"))
    with pytest.raises(CheckpointError, match="domain='books', expected 'music'"):
        tr.load_baseline(sd, "cat-art", data, "music", CPU)
    with pytest.raises(CheckpointError, match="another dataset"):
        ckpt.load(art_path, stage=ca.ART, fingerprint="0" * 64)
    meta = {k: v for k, v in ckpt.read_header(art_path).items() if k not in ("format_version", "package_version")}
    t = load_file(str(art_path))
    t["users"] = t["users"][..., :8]
    ckpt.save(sd / layout.baseline_name("cat-art", "books"), t, meta)
    with pytest.raises(CheckpointError, match="does not match"):
        tr.load_baseline(sd, "cat-art", data, "books", CPU)
    # ART refuses a CAT built from other stage-1 checkpoints, and a run without stage 1
    other = tmp_path / "other"
    shutil.copytree(run, other)
    ca.run_mf(CatArtConfig(**{**FAST, "epochs": 1}), data, other, 0, "books")
    with pytest.raises(CheckpointError, match=r"other mf_sha256 \(books differ\)"):
        ca.run_art(CatArtConfig(**FAST), data, other, 0, "books")
    with pytest.raises(DataError, match="missing"):
        ca.run_cat(CatArtConfig(**FAST), data, tmp_path / "empty", 0)
    # a CAT checkpoint with a tensor missing or misshapen: one CheckpointError naming it (not a KeyError)
    cat_path = run / "seed-0" / layout.CAT_ART_CAT
    mf_sha = ckpt.read_header(cat_path)["mf_sha256"]
    meta = {k: v for k, v in ckpt.read_header(cat_path).items() if k not in ("format_version", "package_version")}
    good = load_file(str(cat_path))
    for name, edit in (("pad", lambda t: t.pop("pad")), ("pad", lambda t: t.update(pad=torch.zeros(3)))):
        t = dict(good)
        edit(t)
        ckpt.save(tmp_path / "cat.safetensors", t, meta)
        with pytest.raises(CheckpointError, match=f"does not match its model .*{name}"):
            ca.load_cat(tmp_path / "cat.safetensors", data, mf_sha, FAST["dim"], CPU)


def test_resume_refuses_other_config(data, tmp_path):
    ca.run_mf(CatArtConfig(**{**FAST, "epochs": 1}), data, tmp_path, 0, "books")
    with pytest.raises(CheckpointError, match="other config"):
        ca.run_mf(CatArtConfig(**{**FAST, "epochs": 1, "dim": 4}), data, tmp_path, 0, "books", resume=True)


# --------------------------------------------------------------------------- CLI and evaluate


ARGS = ["--dim", "8", "--batch-size", "128", "--lr", "0.01", "--epochs", "2", "--cat-epochs", "2", "--device", "cpu"]


def test_cli_trains_and_evaluate_shows_the_row(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")
    run = tmp_path / "r"
    r = run_cli("baseline", "cat-art", "--data", tiny_data, "--run", run, *ARGS, "--domain", "music")
    assert r.exit_code == 0, r.output
    assert "baseline-cat-art: best validation NDCG@10" in r.stdout
    # CAT's progress line names its number: the training loss it stops on, best the lowest (not a valid NDCG@10)
    cat_lines = [x for x in r.stdout.splitlines() if x.startswith(f"{ca.CAT} seed=0 epoch=")]
    assert len(cat_lines) == 2, r.stdout
    losses = []
    for line in cat_lines:
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        assert "valid_ndcg@10" not in fields and "best" not in fields, line
        losses.append(float(fields["loss"]))
        value, epoch = fields["best_loss"].split("@")
        assert float(value) == min(losses) > 0 and losses[int(epoch) - 1] == min(losses), line
    mf_lines = [x for x in r.stdout.splitlines() if x.startswith(f"{ca.MF} books seed=0 epoch=")]
    assert mf_lines and all(" valid_ndcg@10=" in x and " best=" in x for x in mf_lines)
    assert (run / "seed-0" / layout.baseline_name("cat-art", "music")).is_file()
    assert not (run / "seed-0" / layout.baseline_name("cat-art", "books")).exists()
    r = run_cli(
        "evaluate", "--data", tiny_data, "--run", run, "--device", "cpu", "--json", "--k", "10", "--by-activity"
    )
    assert r.exit_code == 0, r.output
    rep = ev.EvalReport.model_validate_json(r.stdout)
    rows = [x for x in rep.rows if x.model == "CAT-ART"]
    assert {x.domain for x in rows} == {"music"} and {x.bucket for x in rows} > {"all"}
    model = tr.load_baseline(run / "seed-0", "cat-art", load_prepared(tiny_data), "music", CPU)
    t = load_prepared(tiny_data).test["music"]
    want = 100 * summarize(tr.rank_model(model, t.users, t.pos, t.negs), [10])[("ndcg", 10)]
    (row,) = [x for x in rows if x.bucket == "all" and x.metric == "ndcg" and x.k == 10]
    assert row.mean == pytest.approx(want, abs=1e-9)
    models = [x.model for x in rep.rows if x.domain == "music" and x.bucket == "all" and x.metric == "ndcg"]
    assert models == ["Random", "Pop", "CAT-ART"]
    r = run_cli("-q", "baseline", "cat-art", "--data", tiny_data, "--run", run, *ARGS, "--domain", "music", "--resume")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "args, text",
    [
        (["--temperature", "0"], "temperature"),
        (["--dropout", "1"], "dropout"),
        (["--layers", "2"], "No such option"),
        (["--domain", "games"], "unknown domain 'games'"),
    ],
)
def test_cli_bad_input_is_one_line(tiny_data, tmp_path, args, text):
    r = run_cli("baseline", "cat-art", "--data", tiny_data, "--run", tmp_path / "r", *ARGS, *args)
    assert r.exit_code in (1, 2), r.output
    assert text in r.stderr and "Traceback" not in r.output
    if r.exit_code == 1:
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- checkpoint names of domains with '-'


def test_domains_whose_checkpoints_would_be_one_file_are_refused():
    kinds, fixed = ("cat-art-mf", "cat-art"), {layout.CAT_ART_CAT: "CAT-ART's CAT stage"}
    layout.check_distinct(["books", "movies", "mf_x", "x-mf", "art"], kinds, fixed)  # distinct: fine
    for domains in (["x", "mf-x"], ["mf-x", "x"]):  # either order: the one ending like "cat-art-mf" is named
        with pytest.raises(DataError) as e:
            layout.check_distinct(domains, kinds, fixed, "prepared/d")
        msg = str(e.value)
        assert "'x' and 'mf-x'" in msg or "'mf-x' and 'x'" in msg, msg
        assert "baseline-cat-art-mf-x.safetensors" in msg and "rename domain 'mf-x' (e.g. to 'mf_x')" in msg, msg
        assert msg.endswith("(prepared/d)") and "\n" not in msg
    with pytest.raises(DataError, match="domain 'cat' would write baseline-cat-art-cat.safetensors .*CAT stage"):
        layout.check_distinct(["books", "cat"], kinds, fixed)
    with pytest.raises(DataError, match="'x' and 'walk-x'.*rename domain 'walk-x'"):
        layout.check_distinct(["x", "walk-x"], ("ga-mtcdr-walk", "ga-mtcdr"))


def renamed(data, names):
    """``data`` with its domains called ``names``."""
    new = dict(zip(data.domains, names))
    return dataclasses.replace(
        data,
        domains=list(names),
        valid={new[k]: v for k, v in data.valid.items()},
        test={new[k]: v for k, v in data.test.items()},
    )


@pytest.mark.parametrize(
    "run_seed, cfg, names, blamed",
    [
        (ca.run_seed, CatArtConfig(**FAST), ["x", "mf-x"], "mf-x"),
        (ca.run_seed, CatArtConfig(**FAST), ["cat", "b"], "cat"),
        (ga_mtcdr.run_seed, GaMtcdrConfig(dim=8, device="cpu"), ["walk-b", "b"], "walk-b"),
        (ga_mtcdr.run_seed, GaMtcdrConfig(dim=8, device="cpu"), ["a", "joint"], "joint"),
        (herograph.run_seed, HeroGraphConfig(dim=8, device="cpu"), ["a", "joint"], "joint"),
    ],
)
def test_cross_domain_stages_refuse_clashing_domains_before_writing(tmp_path, run_seed, cfg, names, blamed):
    hand = renamed(two_groups(), names)
    with pytest.raises(DataError, match=f"rename domain '{blamed}'"):
        run_seed(cfg, hand, tmp_path, 0, hand.domains)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the seed folder


def test_cli_refuses_clashing_domains_in_one_line(tmp_path):
    prepare.run(PrepareConfig(source="synthetic", preset="tiny", domains=["x", "mf-x"], out=tmp_path / "d", seed=0))
    run = tmp_path / "r"
    r = run_cli("baseline", "cat-art", "--data", tmp_path / "d", "--run", run, *ARGS)
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("error: domains 'x' and 'mf-x' would write one file") and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1 and "rename domain 'mf-x'" in r.stderr
    assert not list(run.rglob("*.safetensors")) and not (run / layout.CONFIG).exists()


def test_paper_config_pins_the_published_recipe_whatever_the_defaults():
    """examples/paper/cat-art.toml is CAT-ART as published (λ 5e-5, Adam 1e-3); the defaults were tuned on
    validation (docs/results.md) and differ from it."""
    import tomllib
    from pathlib import Path

    from uclr_cli.config import CatArtConfig

    path = Path(__file__).resolve().parents[1] / "examples" / "paper" / "cat-art.toml"
    cfg = CatArtConfig(**tomllib.loads(path.read_text()))
    assert (cfg.reg, cfg.lr, cfg.batch_size, cfg.cat_batch_size, cfg.cat_lr) == (5e-5, 1e-3, 2048, 256, 1e-3)
    assert (cfg.temperature, cfg.cl_weight, cfg.rec_weight, cfg.dropout) == (0.1, 0.2, 0.4, 0.1)
    assert (CatArtConfig().reg, CatArtConfig().lr) == (3e-2, 3e-3)
