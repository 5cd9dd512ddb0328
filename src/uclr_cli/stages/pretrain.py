"""PGE: BPR-MF over the train interactions of all domains (paper §3.3, DESIGN §3).

The negative for a positive of domain d is a random item of domain d
(resampled when it collides with the user's train items). Early stopping on
validation NDCG@10 averaged over domains; the best epoch is what is saved.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from uclr_cli import checkpoint as ckpt
from uclr_cli import layout, loop
from uclr_cli.config import PretrainConfig
from uclr_cli.data.dataset import Dataset
from uclr_cli.losses import bpr_objective
from uclr_cli.optim import BPRRowAdam, load_torch_optimizer_tensors, torch_optimizer_tensors
from uclr_cli.sampling import NegativeSampler

STAGE = "pretrain"
ROWWISE_BETA1 = {"rowwise-adam": 0.9, "rowwise-rmsprop": 0.0}  # optimizers with a fused row-wise step


def init_tables(data: Dataset, cfg: PretrainConfig, seed: int, device: torch.device):
    g = torch.Generator().manual_seed(seed)
    users = torch.randn(data.n_users, cfg.dim, generator=g) * cfg.init_std
    items = torch.randn(data.n_items, cfg.dim, generator=g) * cfg.init_std
    return users.to(device), items.to(device)


def run_seed(
    cfg: PretrainConfig,
    data: Dataset,
    run_dir: Path,
    seed: int,
    *,
    resume: bool = False,
    progress: loop.Progress | None = None,
) -> loop.SeedResult:
    """Train one seed; writes ``seed-<s>/pretrain.safetensors`` (best on valid)."""
    device = loop.resolve_device(cfg.device)
    out_dir = layout.seed_dir(run_dir, seed)
    best_path = out_dir / layout.PRETRAIN
    state_path = out_dir / layout.resume_name(layout.PRETRAIN)
    config = cfg.model_dump(mode="json", exclude={"data", "run", "seeds"})
    timer = loop.Timer()

    users, items = init_tables(data, cfg, seed, device)
    rowwise = cfg.optimizer in ROWWISE_BETA1
    if rowwise:  # one table, users first: users/items are views of it
        emb = torch.cat([users, items])
        users, items = emb[: data.n_users], emb[data.n_users :]
    gen = loop.generator(device, seed, 1)
    tu, ti, td = (t.to(device) for t in (data.train_user, data.train_item, data.train_domain))
    sampler = NegativeSampler(data, device)
    names = ["user_emb", "item_emb"]
    if rowwise:
        opt = BPRRowAdam(emb, data.n_users, lr=cfg.lr, reg=cfg.reg, betas=(ROWWISE_BETA1[cfg.optimizer], 0.999))
    else:
        users.requires_grad_(True)
        items.requires_grad_(True)
        opt = torch.optim.Adam([users, items], lr=cfg.lr, fused=True)

    start, best, best_epoch, bad = 1, -math.inf, 0, 0
    per_domain_best: dict[str, float] = {}
    if resume and state_path.is_file():
        t, meta = ckpt.load(
            state_path,
            stage=STAGE + "-resume",
            fingerprint=data.fingerprint,
            expect={"config": config, "seed": seed},
            may_differ={"config": ckpt.RESUME_MAY_DIFFER},
        )
        with torch.no_grad():
            users.copy_(t["user_emb"])
            items.copy_(t["item_emb"])
        if rowwise:
            opt.load_state_tensors(t)
        else:
            load_torch_optimizer_tensors(opt, names, t)
        gen.set_state(t["rng"].to(torch.uint8))
        start, best, best_epoch, bad = meta["epoch"] + 1, meta["best_score"], meta["best_epoch"], meta["bad"]
        per_domain_best = meta["per_domain"]
        if meta["bad"] >= cfg.patience or meta["epoch"] >= cfg.epochs:  # finished (a larger --epochs continues)
            start = cfg.epochs + 1

    n = len(tu)
    epochs_run = start - 1
    # The best tables and the resume state are written together, at most every cfg.save_every seconds (and
    # at the end): at the Amazon shape they are ~200 MB an epoch, as long as a GPU epoch. A kill resumes
    # from the last write, so the two files always agree.
    pending_best, last_save = None, loop.Timer()
    for epoch in range(start, cfg.epochs + 1):
        epochs_run = epoch
        t0 = loop.Timer()
        perm = torch.randperm(n, generator=gen, device=device)
        total = torch.zeros((), device=device)
        for s in range(0, n, cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            u, i, d = tu[idx], ti[idx], td[idx]
            j = sampler(u, d, gen)
            if rowwise:
                loss = opt.step(u, i, j)
            else:
                opt.zero_grad(set_to_none=True)
                loss = bpr_objective(users[u], items[i], items[j], cfg.reg)
                loss.backward()
                opt.step()
            total += loss.detach() * len(idx)
        epoch_loss = float(total) / max(n, 1)
        loop.check_finite(epoch_loss, STAGE, seed, epoch)
        speed = n / max(t0.elapsed(), 1e-9)

        score = None
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            with torch.no_grad():
                per_domain = loop.valid_scores(data, users.detach(), items.detach(), data.valid)
            score = loop.mean_score(per_domain)
            if score > best:
                best, best_epoch, bad, per_domain_best = score, epoch, 0, per_domain
                meta = loop.base_meta(STAGE, data, seed, config, epoch=epoch, best_score=best, dim=cfg.dim)
                pending_best = ({"user_emb": users.detach().clone(), "item_emb": items.detach().clone()}, meta)
            else:
                bad += 1
        done = bad >= cfg.patience or epoch == cfg.epochs
        if done or last_save.elapsed() >= cfg.save_every:
            if pending_best is not None:
                ckpt.save(best_path, *pending_best)
                pending_best = None
            _save_state(
                state_path,
                cfg,
                data,
                seed,
                config,
                users,
                items,
                opt,
                names,
                gen,
                epoch,
                best,
                best_epoch,
                bad,
                per_domain_best,
                done,
            )
            last_save = loop.Timer()
        if progress:
            progress(loop.EpochEvent(STAGE, seed, epoch, cfg.epochs, epoch_loss, score, speed, best, best_epoch))
        if done:
            break

    if not best_path.is_file():  # zero epochs: save the initial tables
        with torch.no_grad():
            per_domain_best = loop.valid_scores(data, users.detach(), items.detach(), data.valid)
        best, best_epoch = loop.mean_score(per_domain_best), 0
        meta = loop.base_meta(STAGE, data, seed, config, epoch=0, best_score=best, dim=cfg.dim)
        ckpt.save(best_path, {"user_emb": users.detach(), "item_emb": items.detach()}, meta)
    return loop.SeedResult(STAGE, seed, best_path, best_epoch, best, epochs_run, timer.elapsed(), per_domain_best)


def _save_state(
    path, cfg, data, seed, config, users, items, opt, names, gen, epoch, best, best_epoch, bad, per_domain, done
):
    tensors = {"user_emb": users.detach(), "item_emb": items.detach(), "rng": gen.get_state()}
    if cfg.optimizer in ROWWISE_BETA1:
        tensors.update(opt.state_tensors())
    else:
        tensors.update(torch_optimizer_tensors(opt, names))
    meta = loop.base_meta(
        STAGE + "-resume",
        data,
        seed,
        config,
        epoch=epoch,
        best_score=best,
        best_epoch=best_epoch,
        bad=bad,
        per_domain=per_domain,
        done=done,
    )
    ckpt.save(path, tensors, meta)
