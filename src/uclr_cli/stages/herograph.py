"""HeroGraph (Cui et al., 2020), reconstructed from the paper's description: a multi-target cross-domain baseline.

One joint model (:class:`uclr_cli.models.herograph.HeroGraph`) over the
shared graph of every domain's train rows, trained with BPR on the target
domains in turn (round-robin, the same number of batches per target in an
epoch), early stopping on validation NDCG@10 averaged over the targets. At a
better epoch every target's scorer is written,
``seed-<s>/baseline-herograph-<domain>`` (what ``uclr evaluate`` scores); the
resume state of the whole is ``baseline-herograph-joint.resume``.

Neighbours: training redraws the sample of every node's (at most
``neighbours``) neighbours at the start of each epoch from the stage's
generator (so a resumed run draws the same ones); validation and the saved
scorers use one sample drawn once per run from a generator of its own, so
that epochs are compared on the same neighbourhoods and a checkpoint scores
exactly what was validated. Validation and test rows never enter the graph.
"""

from __future__ import annotations

from pathlib import Path

import torch

from uclr_cli import layout, loop
from uclr_cli.config import HeroGraphConfig
from uclr_cli.data.dataset import Dataset
from uclr_cli.models.herograph import HeroGraph, SharedGraph
from uclr_cli.optim import RowAdam, load_torch_optimizer_tensors, torch_optimizer_tensors
from uclr_cli.sampling import NegativeSampler
from uclr_cli.trained import baseline_valid_score, build_baseline

JOINT, TARGET = "baseline-herograph-joint", "baseline-herograph"
_KEYS = ("dim", "neighbours", "steps", "reg", "init_std", "batch_size", "lr", "epochs", "patience", "eval_every")


def stage_config(cfg: HeroGraphConfig, targets: list[str]) -> dict:
    """What the stage reads of ``cfg`` (recorded in its checkpoints, checked on resume)."""
    dump = cfg.model_dump(mode="json")
    return {"model": "herograph", **{k: dump[k] for k in _KEYS}, "targets": targets}


def shared_graph(data: Dataset, device) -> SharedGraph:
    """The graph of every domain's train rows (users, then items by global id), on ``device``."""
    return SharedGraph(data.train_user.to(device), data.train_item.to(device), data.n_users, data.n_items)


def cycled_order(n: int, total: int, gen: torch.Generator) -> torch.Tensor:
    """``total`` row indices of ``n`` rows: shuffled passes over all of them, one after another (a smaller domain
    is cycled so that every target has the same number of batches)."""
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=gen.device)
    passes = -(-total // n)
    keys = torch.rand(passes, n, generator=gen, device=gen.device)
    return torch.argsort(keys, dim=1, stable=True).reshape(-1)[:total]


def run_seed(
    cfg: HeroGraphConfig, data: Dataset, run_dir: Path, seed: int, targets: list[str], *, resume=False, progress=None
) -> list[loop.SeedResult]:
    """The joint model over ``targets`` (the graph holds every domain), one scorer per target."""
    layout.check_distinct(
        data.domains, ("herograph",), {layout.HEROGRAPH_JOINT: "HeroGraph's joint training"}, data.path
    )
    device = loop.resolve_device(cfg.device)
    idx = [data.domain_index(t) for t in targets]
    targets = [data.domains[d] for d in idx]
    conf = stage_config(cfg, targets)
    state = loop.Outputs.of(JOINT, data, run_dir, seed, layout.HEROGRAPH_JOINT, conf)
    state.meta = dict(dim=cfg.dim, n_users=data.n_users)
    bests = {}
    for d, dom in zip(idx, targets):
        lo, hi = data.item_offsets[d], data.item_offsets[d + 1]
        bests[dom] = loop.Outputs.of(TARGET, data, run_dir, seed, layout.baseline_name("herograph", dom), conf)
        bests[dom].meta = dict(domain=dom, dim=cfg.dim, n_users=data.n_users, item_offset=lo, n_items=hi - lo)
    timer = loop.Timer()
    graph = shared_graph(data, device)
    init = torch.Generator().manual_seed(seed * 7919 + 701)
    model = HeroGraph(data.n_users, data.item_offsets, cfg.dim, cfg.steps, cfg.init_std, init).to(device)
    rows_opt = RowAdam(model.tables(), cfg.lr)  # the tables: lazy Adam on the rows a step reads
    dense = model.dense_parameters()
    names = [n for n, _ in dense]
    opt = torch.optim.Adam([p for _, p in dense], lr=cfg.lr)  # the aggregators' weights
    gen = loop.generator(device, seed, 700)
    eval_nbrs = graph.sample(cfg.neighbours, loop.generator(device, seed, 701))  # fixed for the run
    sched = loop.Schedule(cfg.epochs, cfg.patience, cfg.eval_every)

    def live() -> dict[str, torch.Tensor]:
        return {
            **{k: v.detach() for k, v in model.state_dict().items()},
            **{f"row{k}": v for k, v in rows_opt.state_tensors().items()},
            **torch_optimizer_tensors(opt, names),
        }

    if resume and state.state.is_file():
        t = state.load_state(sched, gen)
        loop.restore(t, {k: v.detach() for k, v in model.state_dict().items()}, state.state)
        rows_opt.load_state_tensors({k[len("row") :]: v for k, v in t.items() if k.startswith("rowopt.")})
        load_torch_optimizer_tensors(opt, names, t)

    rows = []  # per target: its train users and (global) items
    for d in idx:
        sel = data.train_domain == d
        rows.append((data.train_user[sel].to(device), data.train_item[sel].to(device)))
    sampler = NegativeSampler(data, device)
    per_target = max((len(u) for u, _ in rows), default=0)  # positives per target and epoch: the largest domain's
    latest: dict[str, dict[str, torch.Tensor]] = {}

    def score() -> dict[str, float]:
        model.eval()
        h_users = model.graph_vectors(torch.arange(data.n_users, device=device), eval_nbrs, users=True)
        out = {}
        for d, dom in zip(idx, targets):
            scorer = build_baseline("herograph", conf, data, d, device)
            scorer.load_tensors(model.target_tensors(d, h_users, eval_nbrs))
            latest[dom] = scorer.tensors()
            out[dom] = baseline_valid_score(scorer, data, dom)
        return out

    n_total = per_target * sum(1 for u, _ in rows if len(u))
    for epoch in sched.epochs_to_run():
        t0 = loop.Timer()
        model.train()
        nbrs = graph.sample(cfg.neighbours, gen)  # this epoch's neighbours
        orders = [cycled_order(len(u), per_target, gen) for u, _ in rows]
        total = torch.zeros((), device=device)
        for s in range(0, per_target, cfg.batch_size):  # round-robin: one step per target in turn
            for k, d in enumerate(idx):
                b = orders[k][s : s + cfg.batch_size]
                if len(b) == 0:
                    continue  # a target without train rows
                u, i = rows[k][0][b], rows[k][1][b]
                j = sampler(u, torch.full_like(u, d), gen)
                loss, touched = model.objective(d, u, i, j, nbrs, cfg.reg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                rows_opt.step({name: (ids, leaf.grad) for name, (ids, leaf) in touched.items()})
                total += loss.detach() * len(b)
        epoch_loss = float(total) / max(n_total, 1)  # a host sync: the epoch's training is done
        sched.trained(n_total, t0.elapsed())
        loop.check_finite(epoch_loss, JOINT, seed, epoch)
        sc, improved = sched.validate(epoch, score)
        if improved:
            for dom in targets:
                bests[dom].save_best(latest[dom], epoch, sched.per_domain[dom])
        done = sched.done(epoch)
        state.save_state(sched, epoch, done, live(), gen)
        if progress:
            progress(sched.event(JOINT, seed, epoch, epoch_loss, sc))
        if done:
            break
    if any(not o.best.is_file() for o in bests.values()):  # zero epochs: save the initial models
        sched.start_from(score())
        for dom in targets:
            bests[dom].save_best(latest[dom], 0, sched.per_domain[dom])
    return loop.joint_results(TARGET, seed, sched, {dom: bests[dom].best for dom in targets}, timer)
