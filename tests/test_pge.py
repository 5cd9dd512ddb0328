"""PGE options (issue 11): per-role L2, item bias, negative samplers, row-wise SGD/Adagrad, init, LightGCN encoder."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from uclr_cli import layout
from uclr_cli.config import PretrainConfig
from uclr_cli.data.dataset import load_prepared
from uclr_cli.losses import bpr_objective
from uclr_cli.optim import BPRRowStep
from uclr_cli.sampling import NegativeSampler
from uclr_cli.stages import pretrain

FAST = dict(dim=8, batch_size=256, lr=0.01, epochs=3, patience=5, device="cpu", save_every=0)


@pytest.fixture(scope="module")
def data(tiny_data):
    return load_prepared(tiny_data)


def dense_reference(kind: str, params, lr: float):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=1e-8)
    return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.9), eps=1e-8)  # rmsprop == Adam with beta1 = 0


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "rmsprop"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_step_equals_dense_torch_optimizer_on_the_bpr_objective(kind, bias):
    """Per-role L2 and a fixed bias column: the fused row-wise step is the dense optimizer, exactly."""
    g = torch.Generator().manual_seed(1)
    n_users, n_items, m = 6, 9, 5
    users = torch.randn(n_users, m, generator=g, dtype=torch.float64)
    items = torch.randn(n_items, m, generator=g, dtype=torch.float64)
    if bias:
        users[:, -1] = 1.0
    regs = (0.3, 0.05, 0.0)
    emb = torch.cat([users, items]).clone()
    fused = BPRRowStep(emb, n_users, 0.05, regs, kind=kind, betas=(0.0, 0.9), fixed_last_user_col=bias)
    ru, ri = users.clone().requires_grad_(True), items.clone().requires_grad_(True)
    if bias:
        ru.register_hook(lambda grad: grad.index_fill(1, torch.tensor([m - 1]), 0.0))
    ref = dense_reference(kind, [ru, ri], 0.05)
    for _ in range(7):
        u = torch.randint(0, n_users, (8,), generator=g)  # repeats on purpose
        i = torch.randint(0, n_items, (8,), generator=g)
        j = torch.randint(0, n_items, (8,), generator=g)
        loss = fused.step(u, i, j)
        ref.zero_grad()
        ref_loss = bpr_objective(ru[u], ri[i], ri[j], regs, m - 1 if bias else None)
        ref_loss.backward()
        ref.step()
        assert torch.allclose(loss, ref_loss.detach(), atol=1e-12)
    assert torch.allclose(emb[:n_users], ru.detach(), atol=1e-10)
    assert torch.allclose(emb[n_users:], ri.detach(), atol=1e-10)
    if bias:
        assert torch.equal(emb[:n_users, -1], torch.ones(n_users, dtype=torch.float64))


def test_popularity_negatives_follow_train_counts_and_stay_in_the_domain(data):
    d = 0
    lo, hi = data.item_offsets[d], data.item_offsets[d + 1]
    counts = torch.bincount(data.train_item, minlength=data.n_items)[lo:hi].double()
    n = 200_000
    users = torch.full((n,), data.n_users + 10**6)  # a user with no train items: no collisions to redraw
    gen = torch.Generator().manual_seed(0)
    for kind, share in (("popularity", 1.0), ("mix", 0.5), ("uniform", 0.0)):
        s = NegativeSampler(data, torch.device("cpu"), kind, pop_share=0.5)
        j = s(users, torch.full((n,), d), gen)
        assert int(j.min()) >= lo and int(j.max()) < hi
        freq = torch.bincount(j - lo, minlength=hi - lo).double() / n
        want = share * counts / counts.sum() + (1 - share) / (hi - lo)
        assert (freq - want).abs().max() < 0.004, kind
        if kind == "popularity":
            assert freq[counts == 0].sum() == 0  # never an item without train interactions


def test_negatives_avoid_the_users_train_items(data):
    gen = torch.Generator().manual_seed(0)
    u, i, d = data.train_user, data.train_item, data.train_domain
    for kind in ("uniform", "popularity", "mix"):
        j = NegativeSampler(data, torch.device("cpu"), kind)(u, d, gen)
        hits = torch.isin(u * data.n_items + j, u * data.n_items + i).double().mean()
        assert hits < 0.01, kind  # redrawn three rounds: a collision survives only rarely


def test_item_bias_keeps_the_user_column_at_one_and_learns_item_biases(data, tmp_path):
    for opt in ("rowwise-rmsprop", "rowwise-sgd", "adam"):
        lr = 0.05 if opt == "rowwise-sgd" else 0.01
        pretrain.run_seed(PretrainConfig(**{**FAST, "lr": lr}, item_bias=True, optimizer=opt), data, tmp_path / opt, 0)
        t = load_file(str(layout.seed_dir(tmp_path / opt, 0) / layout.PRETRAIN))
        assert t["user_emb"].shape[1] == FAST["dim"] + 1
        assert torch.equal(t["user_emb"][:, -1], torch.ones(data.n_users)), opt
        bias = t["item_emb"][:, -1]
        assert bias.abs().max() > 0, opt
        # popular items get larger biases: the bias learns popularity
        counts = torch.bincount(data.train_item, minlength=data.n_items).float()
        assert torch.corrcoef(torch.stack([bias, counts]))[0, 1] > 0.3, opt


def test_n_negatives_and_samplers_learn(data, tmp_path):
    for kw in (dict(n_negatives=4), dict(negatives="mix"), dict(optimizer="rowwise-adagrad", lr=0.05)):
        r = pretrain.run_seed(PretrainConfig(**{**FAST, **kw}), data, tmp_path / str(sorted(kw)), 0)
        assert r.best_score > 0.06, kw  # random ranking scores ~0.046


def test_lightgcn_encoder_saves_the_propagated_union_graph_tables(data, tmp_path):
    cfg = PretrainConfig(**{**FAST, "lr": 0.005, "epochs": 1}, encoder="lightgcn", layers=2)
    assert cfg.optimizer == "adam"  # propagation moves every row: dense Adam
    pretrain.run_seed(cfg, data, tmp_path, 0)
    sd = layout.seed_dir(tmp_path, 0)
    best, state = load_file(str(sd / layout.PRETRAIN)), load_file(str(sd / layout.resume_name(layout.PRETRAIN)))
    graph = pretrain.union_graph(data, torch.device("cpu"))
    # the graph holds every distinct train pair, both directions, and no valid/test pair that is not in train
    pairs = torch.unique(data.train_user * data.n_items + data.train_item)
    assert graph.values().numel() == 2 * len(pairs)
    dense = graph.to_dense()
    for split in (*data.valid.values(), *data.test.values()):
        new = ~torch.isin(split.users * data.n_items + split.pos, pairs)
        assert new.any() and torch.all(dense[split.users[new], data.n_users + split.pos[new]] == 0)
    # one epoch: the checkpoint is the mean of layers 0..2 of the resume state's ego tables
    x = torch.cat([state["ego_user"], state["ego_item"]])
    acc, h = x.clone(), x
    for _ in range(2):
        h = torch.sparse.mm(graph, h)
        acc = acc + h
    assert torch.allclose(best["user_emb"], acc[: data.n_users] / 3, atol=1e-6)
    assert torch.allclose(best["item_emb"], acc[data.n_users :] / 3, atol=1e-6)
    assert not torch.allclose(best["user_emb"], state["ego_user"])  # propagation changed them


def _last_tables(run, seed=0):
    t = load_file(str(layout.seed_dir(run, seed) / layout.resume_name(layout.PRETRAIN)))
    return torch.cat([t["user_emb"], t["item_emb"]])


@pytest.mark.parametrize("opt", ["rowwise-sgd", "adam"])
def test_lr_decay_scales_each_epochs_steps(data, tmp_path, opt):
    """Epoch e trains at lr·decay^(e-1): the first epoch is the undecayed one, and a decay of ~0 freezes
    every later epoch (a step of row-wise SGD and of Adam is proportional to lr)."""
    base = {**FAST, "lr": 0.05 if opt == "rowwise-sgd" else 0.01, "optimizer": opt}
    runs = {}
    for name, kw in (("one", dict(epochs=1)), ("two", dict(epochs=2)), ("frozen", dict(epochs=2, lr_decay=1e-12))):
        pretrain.run_seed(PretrainConfig(**{**base, **kw}), data, tmp_path / name, 0)
        runs[name] = _last_tables(tmp_path / name)
    assert not torch.allclose(runs["two"], runs["one"], atol=1e-4)
    assert torch.allclose(runs["frozen"], runs["one"], atol=1e-8)
    decayed = PretrainConfig(**{**base, "epochs": 1, "lr_decay": 0.5})
    pretrain.run_seed(decayed, data, tmp_path / "d1", 0)
    assert torch.equal(_last_tables(tmp_path / "d1"), runs["one"])  # epoch 1 is not decayed


def test_lr_decay_resumes_bit_identical(data, tmp_path):
    """The rate is a function of the epoch alone: stopping after epoch 1 and resuming equals an unbroken run."""
    cfg = {**FAST, "lr_decay": 0.5, "epochs": 3, "patience": 10}
    pretrain.run_seed(PretrainConfig(**cfg), data, tmp_path / "full", 0)
    pretrain.run_seed(PretrainConfig(**{**cfg, "epochs": 1}), data, tmp_path / "cut", 0)
    pretrain.run_seed(PretrainConfig(**cfg), data, tmp_path / "cut", 0, resume=True)
    assert torch.equal(_last_tables(tmp_path / "cut"), _last_tables(tmp_path / "full"))


def _drop_config_key(path, key):
    """Rewrite a checkpoint as a version before ``key`` existed wrote it (its config without the key)."""
    from uclr_cli import checkpoint as ckpt

    meta = ckpt.read_header(path)
    meta["config"] = {k: v for k, v in meta["config"].items() if k != key}
    keep = {k: v for k, v in meta.items() if k not in ("format_version", "package_version", ckpt.DIGEST)}
    ckpt.save(path, load_file(str(path)), keep)


def test_a_state_saved_before_lr_decay_existed_resumes_at_decay_1_only(data, tmp_path):
    """Runs saved before --lr-decay trained at a constant rate: they resume as decay 1, and are refused
    for another decay (one line naming the key), instead of being refused for the new key alone."""
    from uclr_cli.errors import CheckpointError

    cfg = {**FAST, "epochs": 2, "patience": 10}
    pretrain.run_seed(PretrainConfig(**cfg), data, tmp_path / "full", 0)
    pretrain.run_seed(PretrainConfig(**{**cfg, "epochs": 1}), data, tmp_path / "old", 0)
    sd = layout.seed_dir(tmp_path / "old", 0)
    for name in (layout.PRETRAIN, layout.resume_name(layout.PRETRAIN)):
        _drop_config_key(sd / name, "lr_decay")
    with pytest.raises(CheckpointError, match="lr_decay"):
        pretrain.run_seed(PretrainConfig(**{**cfg, "lr_decay": 0.5}), data, tmp_path / "old", 0, resume=True)
    pretrain.run_seed(PretrainConfig(**cfg), data, tmp_path / "old", 0, resume=True)
    assert torch.equal(_last_tables(tmp_path / "old"), _last_tables(tmp_path / "full"))


def test_config_refuses_options_that_do_not_apply():
    for kw, msg in (
        (dict(encoder="lightgcn", optimizer="rowwise-sgd"), "dense Adam"),
        (dict(encoder="lightgcn", item_bias=True), "item_bias"),
        (dict(layers=3), "lightgcn only"),
        (dict(pop_share=0.2), "mix only"),
    ):
        with pytest.raises(ValidationError, match=msg):
            PretrainConfig(**kw)
    assert PretrainConfig(reg=0.1, reg_neg=0.0).role_regs() == (0.1, 0.1, 0.0)


def test_paper_configs_pin_the_papers_pge_whatever_the_defaults():
    """examples/paper reproduces the paper's PGE exactly, even though our defaults moved away from it."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples" / "paper"
    pre = tomllib.loads((root / "pretrain.toml").read_text())
    abl = tomllib.loads((root / "ablate.toml").read_text())["pretrain"]
    for conf in (pre, abl):
        cfg = PretrainConfig(**conf)
        got = (cfg.optimizer, cfg.reg, cfg.role_regs(), cfg.lr, cfg.dim, cfg.batch_size, cfg.init, cfg.init_std)
        assert got == ("adam", 1e-5, (1e-5,) * 3, 1e-3, 128, 2048, "normal", 0.1)
        assert (cfg.negatives, cfg.n_negatives, cfg.item_bias, cfg.encoder) == ("uniform", 1, False, "mf")
        assert (cfg.lr_decay, PretrainConfig().lr_decay) == (1.0, 1.0)
    from uclr_cli.config import FinetuneConfig

    ft = tomllib.loads((root / "finetune.toml").read_text())
    for conf in (ft, tomllib.loads((root / "ablate.toml").read_text())["finetune"]):
        cfg = FinetuneConfig(**conf)  # the paper's finetune keeps its contrastive term over the whole batch
        assert (cfg.contrast_weight, cfg.contrast_users, cfg.batch_size) == (1.0, None, 2048)


def test_item_bias_column_passes_through_contrast_and_finetune(data, tmp_path):
    """The users' constant column is not the autoencoder's or the adapter's to learn: it comes out as 1."""
    from uclr_cli import trained
    from uclr_cli.config import ContrastConfig, FinetuneConfig
    from uclr_cli.stages import contrast, finetune

    pretrain.run_seed(PretrainConfig(**FAST, item_bias=True), data, tmp_path, 0)
    contrast.run_seed(ContrastConfig(batch_size=64, epochs=2, hidden=[8, 4], device="cpu"), data, tmp_path, 0)
    dom = data.domains[0]
    finetune.run_domain(FinetuneConfig(batch_size=256, epochs=1, rank=2, device="cpu"), data, tmp_path, 0, dom)
    sd = layout.seed_dir(tmp_path, 0)
    assert load_file(str(sd / layout.CONTRAST["individual"]))["ae.encoder.0.weight"].shape[1] == FAST["dim"]
    assert load_file(str(sd / layout.finetune_name(dom)))["lora_a"].shape[1] == FAST["dim"]
    for variant in ("PGE+UCL-AE", "UCLR"):
        for users, items in trained.vectors(sd, variant, data, torch.device("cpu")).values():
            assert users.shape[1] == items.shape[1] == FAST["dim"] + 1
            assert torch.equal(users[:, -1], torch.ones(data.n_users)), variant
