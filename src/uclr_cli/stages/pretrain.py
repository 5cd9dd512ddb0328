"""PGE: BPR over the train interactions of all domains (paper §3.3, docs/design.md §3).

The encoder is matrix factorisation (``mf``, the paper's) or LightGCN on the
union user-item graph of every domain's train rows (``lightgcn``): one node per
shared user, the items of every domain; the saved tables are then the
propagated ones, which is what contrast, finetune and evaluate consume. The
negative for a positive of domain d comes from domain d (uniform, by
popularity, or a mix; resampled when it collides with the user's train
items). With ``item_bias`` the tables get one more column, 1 in every user
row and a learned bias in every item row, so a score is still a dot product.
Early stopping on validation NDCG@10 averaged over domains; the best epoch is
what is saved. Under ``torchrun`` the loop is data-parallel (``world``,
:mod:`uclr_cli.distributed`): each rank trains on its share of every global
batch, the gradients are summed; every rank writes its rows of each save's DCP
state (:mod:`uclr_cli.dcp`), and rank 0 writes the safetensors files at the end. With ``--sharding``
the tables themselves are split over the ranks by torchrec (:mod:`uclr_cli.sharded`), trained with dense
Adam; validation and every save see the whole tables, gathered, in the layout above.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from uclr_cli import distributed, layout, loop, sharded
from uclr_cli.config import ROWWISE, PretrainConfig
from uclr_cli.data.dataset import Dataset
from uclr_cli.losses import bpr_objective
from uclr_cli.models.baselines import LightGCN, normalized_graph
from uclr_cli.optim import BPRRowStep, load_torch_optimizer_tensors, torch_optimizer_tensors
from uclr_cli.sampling import NegativeSampler

STAGE = "pretrain"


def init_tables(data: Dataset, cfg: PretrainConfig, seed: int, device: torch.device):
    """Initial user and item tables (normal or uniform with std ``init_std``; the bias column: 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    if cfg.init == "normal":
        users = torch.randn(data.n_users, cfg.dim, generator=g) * cfg.init_std
        items = torch.randn(data.n_items, cfg.dim, generator=g) * cfg.init_std
    else:  # uniform(-a, a) has std a / sqrt(3)
        a = cfg.init_std * math.sqrt(3.0)
        users = (torch.rand(data.n_users, cfg.dim, generator=g) * 2 - 1) * a
        items = (torch.rand(data.n_items, cfg.dim, generator=g) * 2 - 1) * a
    if cfg.item_bias:
        users = torch.cat([users, torch.ones(data.n_users, 1)], 1)
        items = torch.cat([items, torch.zeros(data.n_items, 1)], 1)
    return users.to(device), items.to(device)


def set_lr(opt, lr: float) -> None:
    """The learning rate of the next steps, for the row-wise step and torch's optimizers alike."""
    if isinstance(opt, BPRRowStep):
        opt.lr = lr
    else:
        for group in opt.param_groups:
            group["lr"] = lr


def union_graph(data: Dataset, device) -> torch.Tensor:
    """The normalised user-item graph of every domain's train rows (global item ids; no valid/test rows)."""
    return normalized_graph(data.train_user.to(device), data.train_item.to(device), data.n_users, data.n_items)


def run_seed(
    cfg: PretrainConfig,
    data: Dataset,
    run_dir: Path,
    seed: int,
    *,
    resume: bool = False,
    progress: loop.Progress | None = None,
    world: distributed.World = distributed.SINGLE,
) -> loop.SeedResult:
    """Train one seed; writes ``seed-<s>/pretrain.safetensors`` (best on valid; rank 0 of ``world`` only, and
    until the end ``seed-<s>/pretrain.dcp`` with every rank)."""
    device = distributed.device_for(loop.resolve_device(cfg.device))
    config = cfg.model_dump(mode="json", exclude={"data", "run", "seeds"})
    out = loop.Outputs.of(STAGE, data, run_dir, seed, layout.PRETRAIN, config)
    out.meta = {"dim": cfg.dim, "item_bias": cfg.item_bias}  # dim: the learned columns
    timer = loop.Timer()

    users, items = init_tables(data, cfg, seed, device)
    regs = cfg.role_regs()
    gcn = shard = None
    rowwise = cfg.optimizer in ROWWISE
    shapes = {"user_emb": (data.n_users, cfg.dim), "item_emb": tuple(items.shape)}  # sharded: no fixed column
    if cfg.sharding != "none":  # mf with dense Adam (config.py): each rank steps the shards it holds
        shard = sharded.build(cfg.sharding, data.n_users, data.n_items, cfg.dim, items.shape[1], world.size)
        sharded.load(shard, {"user_emb": users[:, : cfg.dim], "item_emb": items})
        opt = torch.optim.Adam([p for p, _, _ in sharded.shards(shard).values()], lr=cfg.lr, fused=True)
    elif cfg.encoder == "lightgcn":  # ego tables trained through the propagation; dense Adam (every row moves)
        gcn = LightGCN(data.n_users, data.n_items, 0, cfg.dim, cfg.layers, union_graph(data, device)).to(device)
        with torch.no_grad():
            gcn.user_emb.copy_(users)
            gcn.item_emb.copy_(items)
        params, names = [gcn.user_emb, gcn.item_emb], ["ego_user", "ego_item"]
        opt = torch.optim.Adam(params, lr=cfg.lr)
    elif rowwise:  # one table, users first: users/items are views of it
        emb = torch.cat([users, items])
        users, items = emb[: data.n_users], emb[data.n_users :]
        kind = ROWWISE[cfg.optimizer]
        opt = BPRRowStep(emb, data.n_users, cfg.lr, regs, kind=kind, fixed_last_user_col=cfg.item_bias)
    else:
        users.requires_grad_(True)
        items.requires_grad_(True)
        if cfg.item_bias:  # the users' bias partner column stays 1: no gradient reaches it
            users.register_hook(lambda g: g.index_fill(1, torch.tensor([cfg.dim], device=g.device), 0.0))
        params, names = [users, items], ["user_emb", "item_emb"]
        opt = torch.optim.Adam(params, lr=cfg.lr, fused=True)
    gen = loop.generator(device, seed, 1)
    tu, ti, td = (t.to(device) for t in (data.train_user, data.train_item, data.train_domain))
    sampler = NegativeSampler(data, device, cfg.negatives, cfg.pop_share)
    k = cfg.n_negatives
    free = cfg.dim if cfg.item_bias else None

    def weights() -> dict[str, torch.Tensor]:
        """What training changes (the ego tables for lightgcn; the gathered shards with --sharding)."""
        if shard is not None:
            return with_fixed_column(sharded.gather(sharded.shards(shard), shapes, world))
        if gcn is not None:
            return {"ego_user": gcn.user_emb.detach(), "ego_item": gcn.item_emb.detach()}
        return {"user_emb": users.detach(), "item_emb": items.detach()}

    def tables() -> dict[str, torch.Tensor]:
        """What the checkpoint holds and every later stage scores with."""
        if gcn is None:
            return weights()
        u, i = gcn.tables()
        return {"user_emb": u, "item_emb": i}

    def with_fixed_column(t: dict[str, torch.Tensor], value: float = 1.0) -> dict[str, torch.Tensor]:
        """Sharded tables or moments in one process's layout: the users' bias partner column put back."""
        if cfg.item_bias:
            t["user_emb"] = torch.cat([t["user_emb"], torch.full((data.n_users, 1), value)], 1)
        return t

    def opt_tensors() -> dict[str, torch.Tensor]:
        if shard is not None:  # dense Adam's state as one process's: the fixed column's moments are 0
            pieces, step = sharded.adam_pieces(shard, opt)
            held = world.sum_(torch.tensor([float(bool(pieces["exp_avg"]))]))[0]  # ranks with a stepped shard
            if not held:
                return {}  # before the first step, as torch's Adam
            step = world.sum_(step.reshape(1))[0] / held  # those ranks agree on it
            out = {}
            for field, part in pieces.items():
                for name, t in with_fixed_column(sharded.gather(part, shapes, world), 0.0).items():
                    out[f"opt.{field}.{name}"] = t
            return {**{f"opt.step.{name}": step.clone() for name in sharded.TABLES}, **out}
        return opt.state_tensors() if rowwise and gcn is None else torch_optimizer_tensors(opt, names)

    sched = loop.Schedule(cfg.epochs, cfg.patience, cfg.eval_every)
    # best: the best tables on validation and their epoch, until written (one process); a data-parallel run
    # keeps them, since each of its DCP states holds them (loop.Outputs.save)
    best = None
    if resume:  # the newest resume state: the safetensors file, or the DCP state of a data-parallel run
        t, best = out.resume(sched, gen, world)
        if t is not None and shard is not None:
            live = weights()
            loop.restore(t, live, t.path)
            sharded.load(shard, {"user_emb": live["user_emb"][:, : cfg.dim], "item_emb": live["item_emb"]})
            if "opt.step.user_emb" in t:
                moments = {
                    f: {n: t[f"opt.{f}.{n}"][:, : shapes[n][1]] for n in sharded.TABLES}
                    for f in ("exp_avg", "exp_avg_sq")
                }
                sharded.load_adam(shard, opt, moments, float(t["opt.step.user_emb"]))
        elif t is not None:
            loop.restore(t, weights(), t.path)
            if rowwise and gcn is None:
                opt.load_state_tensors(t)
            else:
                load_torch_optimizer_tensors(opt, names, t)

    n = len(tu)
    # The best tables and the resume state are written together, at most every cfg.save_every seconds (and
    # at the end): at the Amazon shape they are ~200 MB an epoch, as long as a GPU epoch. A kill resumes
    # from the last write, so the two always agree. Under torchrun: one DCP state, each rank its rows.
    last_save = loop.Timer()
    for epoch in sched.epochs_to_run():
        t0 = loop.Timer()
        set_lr(opt, cfg.lr * cfg.lr_decay ** (epoch - 1))  # a function of the epoch alone: resume needs nothing
        perm = torch.randperm(n, generator=gen, device=device)
        total = torch.zeros((), device=device)
        for s in range(0, n, cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            u, i, d = tu[idx], ti[idx], td[idx]
            if k > 1:  # one BPR pair per negative
                u, i, d = u.repeat_interleave(k), i.repeat_interleave(k), d.repeat_interleave(k)
            j = sampler(u, d, gen)  # for the whole global batch: the same draws on every rank
            lo, hi = world.part(len(u))  # this rank's share (the whole batch in one process)
            if shard is not None:  # torchrec looks the rows up at their shards and sums the gradients there
                opt.zero_grad(set_to_none=True)
                eu, ip, ineg = sharded.lookup(shard, u[lo:hi], i[lo:hi], j[lo:hi], -(-len(u) // world.size))
                if cfg.item_bias:
                    eu = torch.cat([eu, torch.ones(len(eu), 1)], 1)
                if hi > lo:
                    loss = bpr_objective(eu, ip, ineg, regs, free) * ((hi - lo) / len(u))
                else:  # an empty share still takes part in torchrec's backward exchange
                    loss = (eu.sum() + ip.sum() + ineg.sum()) * 0.0
                loss.backward()
                opt.step()
            elif rowwise and gcn is None:
                spread = world.size > 1
                loss = opt.step(u, i, j, part=(lo, hi) if spread else None, reduce=world.sum_ if spread else None)
            else:
                opt.zero_grad(set_to_none=True)
                loss = torch.zeros((), device=device)
                if hi > lo:
                    ul, il, jl = u[lo:hi], i[lo:hi], j[lo:hi]
                    if gcn is not None:
                        loss = gcn.objective(ul, il, jl, regs)
                    else:
                        loss = bpr_objective(users[ul], items[il], items[jl], regs, free)
                    if hi - lo < len(u):  # its part of the global batch's mean
                        loss = loss * ((hi - lo) / len(u))
                    loss.backward()
                world.sum_grads(params)  # a no-op in one process
                opt.step()
            total += loss.detach() * len(idx)
        epoch_loss = float(world.sum_(total)) / max(n, 1)  # a host sync: the epoch's training is done
        sched.trained(n, t0.elapsed())
        loop.check_finite(epoch_loss, STAGE, seed, epoch)

        with torch.no_grad():
            score, improved = sched.validate(epoch, lambda: loop.valid_scores(data, *tables().values(), data.valid))
        if improved:
            best = ({k_: v.clone() for k_, v in tables().items()}, epoch)
        done = sched.done(epoch)
        if world.rank0s(done or last_save.elapsed() >= cfg.save_every, device):  # a DCP save takes every rank
            best = out.save(sched, epoch, done, {**weights(), **opt_tensors()}, gen, best, world)
            last_save = loop.Timer()
        if progress:
            progress(sched.event(STAGE, seed, epoch, epoch_loss, score))
        if done:
            break

    if shard is not None and world.rank0s(not out.best.is_file()):  # zero epochs: the gather takes every rank
        initial = tables()
        if world.main:
            with torch.no_grad():
                sched.start_from(loop.valid_scores(data, *initial.values(), data.valid))
            out.save_best(initial, 0, sched.best)
    elif shard is None and world.main and not out.best.is_file():  # zero epochs: save the initial tables
        with torch.no_grad():
            sched.start_from(loop.valid_scores(data, *tables().values(), data.valid))
        out.save_best(tables(), 0, sched.best)
    return sched.result(STAGE, seed, out.best, timer)
