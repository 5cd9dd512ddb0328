"""Training stages: learning is real, determinism, resume after SIGKILL, τ behaviour, configs."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, uclr_process
from uclr_cli import checkpoint as ckpt
from uclr_cli import layout, registry
from uclr_cli import trained as tr
from uclr_cli.config import ContrastConfig, FinetuneConfig, PretrainConfig
from uclr_cli.data.dataset import load_prepared
from uclr_cli.errors import CheckpointError, DataError
from uclr_cli.metrics import positive_ranks, summarize
from uclr_cli.stages import contrast, finetune, pretrain

FAST_PRE = dict(dim=16, batch_size=256, lr=0.01, epochs=12, patience=3, device="cpu")
FAST_CON = dict(batch_size=64, lr=0.003, epochs=4, patience=2, device="cpu", hidden=[16, 8])
FAST_FT = dict(batch_size=256, lr=0.003, epochs=3, patience=2, device="cpu", rank=4)


@pytest.fixture(scope="module")
def data(tiny_data):
    return load_prepared(tiny_data)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One seed through every stage: pretrain, the three contrast variants, finetune all."""
    run = tmp_path_factory.mktemp("run")
    res = {"pre": pretrain.run_seed(PretrainConfig(**FAST_PRE), data, run, 0)}
    for mode in ("individual", "global", "none"):
        res[mode] = contrast.run_seed(ContrastConfig(temperature=mode, **FAST_CON), data, run, 0)
    res["ft"] = [finetune.run_domain(FinetuneConfig(**FAST_FT), data, run, 0, d) for d in data.domains]
    return run, res


def floor_scores(data):
    pop = torch.bincount(data.train_item, minlength=data.n_items).float()
    out = {}
    for name, ev in data.valid.items():
        out[name] = summarize(positive_ranks(pop[ev.pos], pop[ev.negs]), [10])[("ndcg", 10)]
    return out


def test_pretrain_beats_random_and_pop(data, trained):
    _, res = trained
    pop = floor_scores(data)
    # random scorer: NDCG@10 of a uniformly random rank among 100 is ~0.046
    for name, score in res["pre"].per_domain.items():
        assert score > 0.15, (name, score)
        assert score > pop[name], (name, score, pop[name])


def test_checkpoints_and_variants(data, trained):
    run, res = trained
    sd = run / "seed-0"
    for name in (layout.PRETRAIN, *layout.CONTRAST.values(), *(layout.finetune_name(d) for d in data.domains)):
        assert (sd / name).is_file(), name
        meta = ckpt.read_header(sd / name)
        assert meta["dataset"] == data.fingerprint and meta["seed"] == 0 and "config" in meta
    assert tr.available(sd, data) == list(registry.VARIANTS)
    for v in registry.VARIANTS:
        vecs = tr.vectors(sd, v, data, torch.device("cpu"))
        assert set(vecs) == set(data.domains)


def test_tau_individual_moves_and_stays_in_bounds(data, trained):
    _, res = trained
    t = load_file(str(res["individual"].path))
    tau = t["tau"]
    cfg = ContrastConfig()
    assert tau.shape == (data.n_users,)
    assert float(tau.min()) >= cfg.tau_min and float(tau.max()) <= cfg.tau_max
    assert float(tau.std()) > 1e-4  # users differ
    assert res["individual"].extra["tau_at_bounds"] < 0.5
    assert set(res["individual"].extra["tau_by_bucket"]) == {"0", "1-2", "3-5", "6-20", "21+"}
    g = load_file(str(res["global"].path))
    assert g["tau"].shape == (1,) and "log_u" in g and "tau_momentum" in g


def test_finetune_keeps_base_and_starts_from_contrast(data, trained):
    run, res = trained
    sd = run / "seed-0"
    pre = load_file(str(sd / layout.PRETRAIN))
    d = data.domains[0]
    t = load_file(str(sd / layout.finetune_name(d)))
    assert "user_emb" not in t and "lora_a" in t and "lora_b" in t  # adapter saved apart from the frozen base
    assert torch.equal(load_file(str(sd / layout.PRETRAIN))["user_emb"], pre["user_emb"])
    # epoch 0 of finetune == the UCL-AE model on that domain
    r = res["ft"][0]
    assert r.best_score >= res["individual"].per_domain[d] - 1e-9


def test_finetune_contrast_users_sets_the_contrastive_batch(data, trained, tmp_path):
    """--contrast-users k: each step's contrastive term covers k users, so at most k·steps users' log u move."""
    import shutil

    run, _ = trained
    d = data.domains[0]
    steps = -(-int((data.train_domain == data.domain_index(d)).sum()) // FAST_FT["batch_size"])
    before = load_file(str(run / "seed-0" / layout.CONTRAST["individual"]))["log_u"]
    moved = {}
    for k in (3, None):
        shutil.copytree(run, tmp_path / str(k))
        finetune.run_domain(
            FinetuneConfig(**{**FAST_FT, "epochs": 1}, contrast_weight=1.0, contrast_users=k),
            data,
            tmp_path / str(k),
            0,
            d,
        )
        state = load_file(str(tmp_path / str(k) / "seed-0" / layout.resume_name(layout.finetune_name(d))))
        moved[k] = int((state["log_u"] != before).sum())
    assert 0 < moved[3] <= 3 * steps < moved[None]


def test_same_seed_bit_identical_other_seed_differs(data, tmp_path):
    cfg = PretrainConfig(**{**FAST_PRE, "epochs": 3})
    paths = [pretrain.run_seed(cfg, data, tmp_path / n, s).path for n, s in (("a", 0), ("b", 0), ("c", 1))]
    a, b, c = (load_file(str(p)) for p in paths)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["user_emb"], c["user_emb"])
    ccfg = ContrastConfig(**{**FAST_CON, "epochs": 2})
    x = [contrast.run_seed(ccfg, data, tmp_path / n, 0).path for n in ("a", "b")]
    ta, tb = load_file(str(x[0])), load_file(str(x[1]))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize(
    "optimizer,save_every", [("adam", 0), ("rowwise-adam", 0), ("rowwise-rmsprop", 0), ("rowwise-rmsprop", 30)]
)
def test_pretrain_continued_with_more_epochs_equals_one_run(data, tmp_path, optimizer, save_every):
    """2 epochs, then --resume with 4, gives the 4-epoch run bit for bit (optimizer state is saved).

    With save_every=30 nothing is written until the run ends: the end is always written.
    """
    cfg = {**FAST_PRE, "optimizer": optimizer, "patience": 10, "save_every": save_every}
    pretrain.run_seed(PretrainConfig(**{**cfg, "epochs": 2}), data, tmp_path / "cut", 0)
    cut = pretrain.run_seed(PretrainConfig(**{**cfg, "epochs": 4}), data, tmp_path / "cut", 0, resume=True)
    ref = pretrain.run_seed(PretrainConfig(**{**cfg, "epochs": 4}), data, tmp_path / "ref", 0)
    a, b = load_file(str(ref.path)), load_file(str(cut.path))
    assert cut.epochs_run == ref.epochs_run == 4 and ref.best_epoch == cut.best_epoch
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the resume state carries the moments: m only where there is momentum
    state = load_file(str(tmp_path / "cut" / "seed-0" / layout.resume_name(layout.PRETRAIN)))
    assert ("opt.m" in state) == (optimizer == "rowwise-adam")


def test_missing_earlier_stage_refused(data, tmp_path):
    with pytest.raises(DataError, match="pretrain checkpoint is missing"):
        contrast.run_seed(ContrastConfig(**FAST_CON), data, tmp_path, 0)


def test_checkpoint_mismatch_refused(data, trained, tmp_path):
    run, _ = trained
    path = run / "seed-0" / layout.PRETRAIN
    with pytest.raises(CheckpointError, match="stage 'pretrain', expected 'contrast'"):
        ckpt.load(path, stage="contrast")
    with pytest.raises(CheckpointError, match="another dataset"):
        ckpt.load(path, stage="pretrain", fingerprint="0" * 64)
    with pytest.raises(CheckpointError, match="dim=16, expected 32"):
        ckpt.load(path, stage="pretrain", expect={"dim": 32})
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError):
        ckpt.load(bad, stage="pretrain")


@pytest.mark.parametrize(
    "stage_args",
    [
        [
            "pretrain",
            "--dim",
            "16",
            "--batch-size",
            "32",
            "--lr",
            "0.005",
            "--epochs",
            "14",
            "--patience",
            "20",
            "--save-every",
            "0",
        ]
    ],
)
def test_resume_after_sigkill_matches_uninterrupted(tiny_data, tmp_path, stage_args):
    common = [*stage_args, "--data", tiny_data, "--device", "cpu"]
    ref = uclr_process(*common, "--run", tmp_path / "ref", cwd=tmp_path)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    state = tmp_path / "cut" / "seed-0" / layout.resume_name(layout.PRETRAIN)
    for delay in (0.05, 0.3):  # kill twice, at different points after an epoch checkpoint
        p = uclr_process(*common, "--run", tmp_path / "cut", *(["--resume"] if state.exists() else []), cwd=tmp_path)
        deadline = time.time() + 120
        start_epoch = ckpt.read_header(state)["epoch"] if state.exists() else 0
        while time.time() < deadline and (not state.exists() or ckpt.read_header(state)["epoch"] <= start_epoch):
            time.sleep(0.01)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not ckpt.read_header(state)["done"], "the run finished before it could be killed; make it longer"
    p = uclr_process(*common, "--run", tmp_path / "cut", "--resume", cwd=tmp_path)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    a = load_file(str(tmp_path / "ref" / "seed-0" / layout.PRETRAIN))
    b = load_file(str(tmp_path / "cut" / "seed-0" / layout.PRETRAIN))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (
        ckpt.read_header(tmp_path / "ref" / "seed-0" / layout.PRETRAIN)["epoch"]
        == ckpt.read_header(tmp_path / "cut" / "seed-0" / layout.PRETRAIN)["epoch"]
    )
    assert not list((tmp_path / "cut" / "seed-0").glob(".*tmp*"))


def test_resume_contrast_and_finetune_in_process(data, tmp_path):
    """Stop after k epochs (as a kill at an epoch boundary would), resume, compare."""
    pretrain.run_seed(PretrainConfig(**{**FAST_PRE, "epochs": 2}), data, tmp_path / "a", 0)
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    full = ContrastConfig(**{**FAST_CON, "epochs": 4, "patience": 10})
    contrast.run_seed(full, data, tmp_path / "a", 0)
    contrast.run_seed(ContrastConfig(**{**FAST_CON, "epochs": 2, "patience": 10}), data, tmp_path / "b", 0)
    # rewrite the resume state's config as if the run had been the 4-epoch one, then resume
    state = tmp_path / "b" / "seed-0" / layout.resume_name(layout.CONTRAST["individual"])
    t = load_file(str(state))
    meta = ckpt.read_header(state)
    meta["config"] = full.model_dump(mode="json", exclude={"data", "run", "seeds"})
    meta["done"] = False
    ckpt.save(state, t, {k: v for k, v in meta.items() if k not in ("format_version", "package_version")})
    contrast.run_seed(full, data, tmp_path / "b", 0, resume=True)
    a = load_file(str(tmp_path / "a" / "seed-0" / layout.CONTRAST["individual"]))
    b = load_file(str(tmp_path / "b" / "seed-0" / layout.CONTRAST["individual"]))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_chain_config_and_summary(tiny_data, tmp_path):
    conf = tmp_path / "pre.toml"
    conf.write_text("dim = 16\nepochs = 2\nbatch-size = 256\nlr = 0.01\n")
    run = tmp_path / "run"
    r = run_cli(
        "pretrain",
        "--data",
        tiny_data,
        "--run",
        run,
        "--config",
        conf,
        "--epochs",
        "1",
        "--seeds",
        "0,1",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["pretrain"]["epochs"] == 1 and resolved["pretrain"]["dim"] == 16  # flag wins, file fills in
    assert "best validation NDCG@10" in r.stdout and (run / "seed-1" / layout.PRETRAIN).is_file()
    r = run_cli(
        "contrast",
        "--data",
        tiny_data,
        "--run",
        run,
        "--seed",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    assert "mean τ by train interactions" in r.stdout
    r = run_cli(
        "finetune",
        "--data",
        tiny_data,
        "--run",
        run,
        "--seed",
        "1",
        "--domain",
        "music",
        "--epochs",
        "1",
        "--rank",
        "2",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    assert (run / "seed-1" / layout.finetune_name("music")).is_file()


@pytest.mark.parametrize(
    "args, where",
    [
        (["contrast", "--mask-ratio", "1.0"], "--mask-ratio"),
        (["contrast", "--tau-min", "2", "--tau-max", "1"], "--tau-min"),
        (["finetune", "--rank", "0"], "--rank"),
        (["pretrain", "--lr", "-1"], "--lr"),
        (["pretrain", "--seeds", "1,x"], "--seeds"),
        (["finetune", "--domain", "games", "--epochs", "1"], "--domain"),
    ],
)
def test_bad_options_one_line(tiny_data, tmp_path, args, where):
    r = run_cli(*args, "--data", tiny_data, "--run", tmp_path / "r")
    assert r.exit_code == 1
    assert r.stderr.startswith("error: ") and where in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_config_file_unknown_key_named(tiny_data, tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text("epochs = 1\nlearning_rate = 0.1\n")
    r = run_cli("pretrain", "--data", tiny_data, "--run", tmp_path / "r", "--config", conf)
    assert r.exit_code == 1 and "learning_rate" in r.stderr and "c.toml" in r.stderr


def test_examples_validate():
    root = Path(__file__).resolve().parents[1] / "examples"
    from uclr_cli.config import CatArtConfig, read_toml

    models = {
        "pretrain": PretrainConfig,
        "contrast": ContrastConfig,
        "finetune": FinetuneConfig,
        "cat-art": CatArtConfig,
    }
    files = sorted(root.rglob("*.toml"))
    assert len(files) >= 7
    for f in files:
        conf = read_toml(f)
        if f.stem == "ablate":
            assert set(conf) <= {"seeds", "domains", "device", "pretrain", "contrast", "finetune"}
            for stage, model in models.items():
                model(**{k.replace("-", "_"): v for k, v in conf.get(stage, {}).items()})
            continue
        stage = next(k for k in models if f.stem.startswith(k))
        models[stage](**conf)


def test_resume_state_written_at_most_every_save_every_seconds(data, tmp_path, monkeypatch):
    """With a long save_every, only the last epoch is written; the best checkpoint matches the saved best epoch."""
    saved = []
    real = ckpt.save

    def recording_save(path, t, meta):
        saved.append((path.name, meta.get("epoch")))
        real(path, t, meta)

    monkeypatch.setattr(ckpt, "save", recording_save)
    res = pretrain.run_seed(
        PretrainConfig(**{**FAST_PRE, "epochs": 5, "patience": 10, "save_every": 3600}), data, tmp_path / "a", 0
    )
    assert saved == [(layout.PRETRAIN, res.best_epoch), (layout.resume_name(layout.PRETRAIN), 5)]
    saved.clear()
    ref = pretrain.run_seed(
        PretrainConfig(**{**FAST_PRE, "epochs": 5, "patience": 10, "save_every": 0}), data, tmp_path / "b", 0
    )
    assert [e for name, e in saved if name != layout.PRETRAIN] == [1, 2, 3, 4, 5]
    a, b = load_file(str(res.path)), load_file(str(ref.path))
    assert all(torch.equal(a[k], b[k]) for k in a) and ref.best_epoch == res.best_epoch
