"""PGE: BPR-MF over the train interactions of all domains (paper §3.3, docs/design.md §3).

The negative for a positive of domain d is a random item of domain d
(resampled when it collides with the user's train items). Early stopping on
validation NDCG@10 averaged over domains; the best epoch is what is saved.
"""

from __future__ import annotations

from pathlib import Path

import torch

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
    config = cfg.model_dump(mode="json", exclude={"data", "run", "seeds"})
    out = loop.Outputs.of(STAGE, data, run_dir, seed, layout.PRETRAIN, config)
    out.meta = {"dim": cfg.dim}
    timer = loop.Timer()

    users, items = init_tables(data, cfg, seed, device)
    rowwise = cfg.optimizer in ROWWISE_BETA1
    if rowwise:  # one table, users first: users/items are views of it
        emb = torch.cat([users, items])
        users, items = emb[: data.n_users], emb[data.n_users :]
        opt = BPRRowAdam(emb, data.n_users, lr=cfg.lr, reg=cfg.reg, betas=(ROWWISE_BETA1[cfg.optimizer], 0.999))
    else:
        users.requires_grad_(True)
        items.requires_grad_(True)
        opt = torch.optim.Adam([users, items], lr=cfg.lr, fused=True)
    gen = loop.generator(device, seed, 1)
    tu, ti, td = (t.to(device) for t in (data.train_user, data.train_item, data.train_domain))
    sampler = NegativeSampler(data, device)
    names = ["user_emb", "item_emb"]

    def tables() -> dict[str, torch.Tensor]:
        return {"user_emb": users.detach(), "item_emb": items.detach()}

    def opt_tensors() -> dict[str, torch.Tensor]:
        return opt.state_tensors() if rowwise else torch_optimizer_tensors(opt, names)

    sched = loop.Schedule(cfg.epochs, cfg.patience, cfg.eval_every)
    if resume and out.state.is_file():
        t = out.load_state(sched, gen)
        loop.restore(t, tables(), out.state)
        if rowwise:
            opt.load_state_tensors(t)
        else:
            load_torch_optimizer_tensors(opt, names, t)

    n = len(tu)
    # The best tables and the resume state are written together, at most every cfg.save_every seconds (and
    # at the end): at the Amazon shape they are ~200 MB an epoch, as long as a GPU epoch. A kill resumes
    # from the last write, so the two files always agree.
    pending_best, last_save = None, loop.Timer()
    for epoch in sched.epochs_to_run():
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
        epoch_loss = float(total) / max(n, 1)  # a host sync: the epoch's training is done
        sched.trained(n, t0.elapsed())
        loop.check_finite(epoch_loss, STAGE, seed, epoch)

        with torch.no_grad():
            score, improved = sched.validate(epoch, lambda: loop.valid_scores(data, *tables().values(), data.valid))
        if improved:
            pending_best = ({k: v.clone() for k, v in tables().items()}, epoch)
        done = sched.done(epoch)
        if done or last_save.elapsed() >= cfg.save_every:
            if pending_best is not None:
                out.save_best(*pending_best, sched.best)
                pending_best = None
            out.save_state(sched, epoch, done, {**tables(), **opt_tensors()}, gen)
            last_save = loop.Timer()
        if progress:
            progress(sched.event(STAGE, seed, epoch, epoch_loss, score))
        if done:
            break

    if not out.best.is_file():  # zero epochs: save the initial tables
        with torch.no_grad():
            sched.start_from(loop.valid_scores(data, *tables().values(), data.valid))
        out.save_best(tables(), 0, sched.best)
    return sched.result(STAGE, seed, out.best, timer)
