"""GA-MTCDR (Zhu et al., TKDE 2023), interaction-only variant, a multi-target cross-domain baseline, in two stages.

1. ``run_walks``: per domain, DeepWalk on the domain's user-item graph of
   train rows (``walks_per_node`` uniform walks of ``walk_length`` from every
   node with edges, per epoch) and skip-gram with negative sampling (window
   ``window``), SGD with word2vec's linear learning-rate decay. The epoch whose
   node vectors score best on the domain's validation rows (user · item) is
   kept, with the vectors of nodes without train edges set to zero:
   ``seed-<s>/baseline-ga-mtcdr-walk-<domain>``.
2. ``run_joint``: one model per target domain (:class:`GATarget`) over the
   frozen node vectors of every domain, the user projections shared by the
   targets, trained round-robin (one step per target in turn) with binary log
   loss on each positive and ``n_negatives`` uniform same-domain negatives,
   Adam, early stopping on validation NDCG@10 averaged over the targets. At a
   better epoch every target's checkpoint is written,
   ``seed-<s>/baseline-ga-mtcdr-<domain>`` (what ``uclr evaluate`` scores);
   the resume state of the whole is ``baseline-ga-mtcdr-joint.resume``.

Validation and test rows never enter a graph, a walk or a loss. Every stage
writes a per-epoch resume state (tables, optimizer, generator); stage 2
records and checks the sha256 of the stage-1 checkpoints it was built from.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from uclr_cli import checkpoint as ckpt
from uclr_cli import layout, loop
from uclr_cli.config import GaMtcdrConfig
from uclr_cli.data.dataset import Dataset, sha256_file
from uclr_cli.errors import CheckpointError
from uclr_cli.metrics import rank_candidates, summarize
from uclr_cli.models.ga_mtcdr import Graph, SkipGram, random_walks, window_pairs
from uclr_cli.optim import load_torch_optimizer_tensors, torch_optimizer_tensors
from uclr_cli.sampling import NegativeSampler
from uclr_cli.trained import baseline_valid_score, build_baseline

WALK, JOINT, TARGET = "baseline-ga-mtcdr-walk", "baseline-ga-mtcdr-joint", "baseline-ga-mtcdr"
_WALK_KEYS = ("dim", "walk_length", "walks_per_node", "window", "sg_negatives", "sg_epochs", "sg_lr", "sg_batch_size")
_JOINT_KEYS = ("dim", "n_negatives", "batch_size", "lr", "reg", "epochs", "patience", "eval_every")
#: walks generated at once (bounds the memory of a chunk's pairs: ~11 pairs per node visited at window 10)
WALK_CHUNK = 16384
#: word2vec's floor of the decayed learning rate, as a share of the start
MIN_LR_SHARE = 1e-4


def stage_configs(cfg: GaMtcdrConfig, targets: list[str]) -> dict[str, dict]:
    """What each stage reads of ``cfg`` (recorded in its checkpoints, checked on resume)."""
    dump = cfg.model_dump(mode="json")
    walk = {"model": "ga-mtcdr-walk", **{k: dump[k] for k in _WALK_KEYS}}
    joint = {"model": "ga-mtcdr", **{k: dump[k] for k in _JOINT_KEYS}, "targets": targets}
    return {WALK: walk, JOINT: joint}


def check_names(data: Dataset) -> None:
    """Refuse domains whose GA-MTCDR checkpoints would be one file (``x`` and ``walk-x``; ``joint``), before any
    write."""
    fixed = {layout.GA_MTCDR_JOINT: "GA-MTCDR's joint training"}
    layout.check_distinct(data.domains, ("ga-mtcdr-walk", "ga-mtcdr"), fixed, data.path)


def domain_graph(data: Dataset, d: int, device) -> Graph:
    """Domain ``d``'s user-item graph of train rows (items local), on ``device``."""
    lo, hi = data.item_offsets[d], data.item_offsets[d + 1]
    sel = data.train_domain == d
    return Graph(data.train_user[sel].to(device), data.train_item[sel].to(device) - lo, data.n_users, hi - lo)


def node_valid_score(vectors: torch.Tensor, data: Dataset, d: int) -> float:
    """Validation NDCG@10 of the node vectors as a recommender (user node · item node) in domain ``d``."""
    ev = data.valid[data.domains[d]].to(vectors.device)
    if len(ev.users) == 0:
        return math.nan
    lo = data.item_offsets[d]
    users, items = vectors[: data.n_users], vectors[data.n_users :]
    return float(summarize(rank_candidates(users, items, ev.users, ev.pos - lo, ev.negs - lo), [10])[("ndcg", 10)])


def run_walks(
    cfg: GaMtcdrConfig, data: Dataset, run_dir: Path, seed: int, domain: str, *, resume=False, progress=None
) -> loop.SeedResult:
    """Stage 1: DeepWalk + skip-gram on ``domain``'s train graph."""
    check_names(data)
    device = loop.resolve_device(cfg.device)
    d = data.domain_index(domain)
    domain, lo, hi = data.domains[d], data.item_offsets[d], data.item_offsets[d + 1]
    conf = stage_configs(cfg, [])[WALK]
    out = loop.Outputs.of(WALK, data, run_dir, seed, layout.baseline_name("ga-mtcdr-walk", domain), conf)
    out.meta = dict(domain=domain, dim=cfg.dim, n_users=data.n_users, item_offset=lo, n_items=hi - lo)
    timer, label = loop.Timer(), f"{WALK} {domain}"
    graph = domain_graph(data, d, device)
    sg = SkipGram(graph.n_nodes, cfg.dim, graph.degree.cpu(), torch.Generator().manual_seed(seed * 7919 + 503 * d))
    sg.to(device)
    gen = loop.generator(device, seed, 500 + d)
    sched = loop.Schedule(cfg.sg_epochs, cfg.sg_epochs + 1, 1)  # no early stop: the best epoch on valid is kept
    if resume and out.state.is_file():
        t = out.load_state(sched, gen, expect={"domain": domain})
        loop.restore(t, sg.tensors(), out.state)
    starts_all = graph.nodes_with_edges()
    isolated = graph.degree == 0

    def kept() -> dict[str, torch.Tensor]:
        return {"nodes": torch.where(isolated.unsqueeze(1), torch.zeros_like(sg.inp), sg.inp)}

    rounds = cfg.sg_epochs * cfg.walks_per_node
    for epoch in sched.epochs_to_run():
        t0 = loop.Timer()
        total, n_pairs = torch.zeros((), dtype=torch.float64, device=device), 0
        for r in range(cfg.walks_per_node):
            done_share = ((epoch - 1) * cfg.walks_per_node + r) / max(rounds, 1)
            lr = cfg.sg_lr * max(1.0 - done_share, MIN_LR_SHARE)  # word2vec: linear decay to a floor
            starts = starts_all[torch.randperm(len(starts_all), generator=gen, device=device)]
            for s in range(0, len(starts), WALK_CHUNK):
                walks = random_walks(graph, starts[s : s + WALK_CHUNK], cfg.walk_length, gen)
                centre, context = window_pairs(walks, cfg.window, gen)
                perm = torch.randperm(len(centre), generator=gen, device=device)
                centre, context = centre[perm], context[perm]
                for b in range(0, len(centre), cfg.sg_batch_size):
                    c, o = centre[b : b + cfg.sg_batch_size], context[b : b + cfg.sg_batch_size]
                    total += sg.step(c, o, sg.negatives((len(c), cfg.sg_negatives), gen), lr)
                n_pairs += len(centre)
        epoch_loss = float(total) / max(n_pairs, 1)
        sched.trained(n_pairs, t0.elapsed())
        loop.check_finite(epoch_loss, label, seed, epoch)
        sc, improved = sched.validate(epoch, lambda: {domain: node_valid_score(kept()["nodes"], data, d)})
        if improved:
            out.save_best(kept(), epoch, sched.best)
        done = sched.done(epoch)
        out.save_state(sched, epoch, done, sg.tensors(), gen)
        if progress:
            progress(sched.event(label, seed, epoch, epoch_loss, sc))
        if done:
            break
    if not out.best.is_file():  # zero epochs (or no validation rows): keep what there is
        sched.start_from({domain: node_valid_score(kept()["nodes"], data, d)})
        out.save_best(kept(), sched.epochs_run, sched.best)
    return sched.result(label, seed, out.best, timer, {domain: sched.best}, {"domain": domain})


def node_tables(cfg: GaMtcdrConfig, data: Dataset, seed_dir: Path, device):
    """(user node vectors (N, U, K), item node vectors per domain, {domain: sha256}) of the stage-1 checkpoints."""
    users, items, shas = [], [], {}
    for d, dom in enumerate(data.domains):
        path = loop.require(seed_dir / layout.baseline_name("ga-mtcdr-walk", dom), "baseline ga-mtcdr walks")
        lo, hi = data.item_offsets[d], data.item_offsets[d + 1]
        expect = {"domain": dom, "n_users": data.n_users, "item_offset": lo, "n_items": hi - lo, "dim": cfg.dim}
        t, _ = ckpt.load(path, stage=WALK, fingerprint=data.fingerprint, expect=expect)
        nodes = t.get("nodes")
        if nodes is None or tuple(nodes.shape) != (data.n_users + hi - lo, cfg.dim):
            raise CheckpointError("checkpoint does not match its model (tensor 'nodes')", path)
        nodes = nodes.to(device)
        users.append(nodes[: data.n_users])
        items.append(nodes[data.n_users :])
        shas[dom] = sha256_file(path)
    return torch.stack(users), items, shas


def run_joint(
    cfg: GaMtcdrConfig, data: Dataset, run_dir: Path, seed: int, targets: list[str], *, resume=False, progress=None
) -> list[loop.SeedResult]:
    """Stage 2: the target models over the frozen node vectors, trained round-robin over ``targets``."""
    check_names(data)
    device = loop.resolve_device(cfg.device)
    idx = [data.domain_index(t) for t in targets]
    targets = [data.domains[d] for d in idx]
    sdir = layout.seed_dir(run_dir, seed)
    user_nodes, item_nodes, walk_sha = node_tables(cfg, data, sdir, device)
    has = (data.train_counts > 0).to(device)  # (N, U): user u has train rows in domain d
    conf = stage_configs(cfg, targets)[JOINT]
    state = loop.Outputs.of(JOINT, data, run_dir, seed, layout.GA_MTCDR_JOINT, conf)
    state.meta = dict(dim=cfg.dim, n_users=data.n_users, walk_sha256=walk_sha)
    bests = {}
    for d, dom in zip(idx, targets):
        lo, hi = data.item_offsets[d], data.item_offsets[d + 1]
        bests[dom] = loop.Outputs.of(TARGET, data, run_dir, seed, layout.baseline_name("ga-mtcdr", dom), conf)
        bests[dom].meta = dict(
            domain=dom, dim=cfg.dim, n_users=data.n_users, item_offset=lo, n_items=hi - lo, walk_sha256=walk_sha
        )
    timer = loop.Timer()
    init = torch.Generator().manual_seed(seed * 7919 + 601)
    models = [build_baseline("ga-mtcdr", conf, data, d, device, init) for d in idx]
    with torch.no_grad():
        models[0].user_nodes.copy_(user_nodes)
        models[0].has.copy_(has)
        for m, d in zip(models, idx):
            m.share(models[0])  # one P_k per domain and one frozen user table for every target
            m.item_nodes.copy_(item_nodes[d])
    joint = torch.nn.ModuleList(models)
    named = list(joint.named_parameters())  # shared parameters once
    names = [n for n, _ in named]
    opt = torch.optim.Adam([p for _, p in named], lr=cfg.lr)
    gen = loop.generator(device, seed, 600)
    sched = loop.Schedule(cfg.epochs, cfg.patience, cfg.eval_every)
    params = lambda: {n: p.detach() for n, p in named}  # noqa: E731
    if resume and state.state.is_file():
        t = state.load_state(sched, gen, expect={"walk_sha256": walk_sha})
        loop.restore(t, params(), state.state)
        load_torch_optimizer_tensors(opt, names, t)

    rows = []  # per target: its train users and local items
    for d in idx:
        sel = data.train_domain == d
        rows.append((data.train_user[sel].to(device), data.train_item[sel].to(device) - data.item_offsets[d]))
    sampler = NegativeSampler(data, device)
    n_neg = cfg.n_negatives
    per_step = max(1, cfg.batch_size // (1 + n_neg))  # positives per step: the batch counts their negatives too
    labels = torch.zeros(per_step, 1 + n_neg, device=device)
    labels[:, 0] = 1.0

    def score() -> dict[str, float]:
        joint.eval()
        return {dom: baseline_valid_score(m, data, dom) for m, dom in zip(models, targets)}

    n_total = sum(len(u) for u, _ in rows)
    for epoch in sched.epochs_to_run():
        t0 = loop.Timer()
        joint.train()
        perms = [torch.randperm(len(u), generator=gen, device=device) for u, _ in rows]
        total = torch.zeros((), device=device)
        longest = max((len(p) for p in perms), default=0)
        for s in range(0, longest, per_step):  # round-robin: one step per target in turn, as the original
            for k, (m, d) in enumerate(zip(models, idx)):
                b = perms[k][s : s + per_step]
                if len(b) == 0:
                    continue  # this target's epoch is done
                u, i = rows[k][0][b], rows[k][1][b]
                uu = u.repeat_interleave(n_neg)
                j = sampler(uu, torch.full_like(uu, d), gen) - data.item_offsets[d]
                items = torch.cat([i.unsqueeze(1), j.reshape(-1, n_neg)], 1)
                loss = m.objective(u, items, labels[: len(b)], cfg.reg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * len(b)
        epoch_loss = float(total) / max(n_total, 1)  # a host sync: the epoch's training is done
        sched.trained(n_total, t0.elapsed())
        loop.check_finite(epoch_loss, JOINT, seed, epoch)
        sc, improved = sched.validate(epoch, score)
        if improved:
            for m, dom in zip(models, targets):
                bests[dom].save_best(m.tensors(), epoch, sched.per_domain[dom])
        done = sched.done(epoch)
        state.save_state(sched, epoch, done, {**params(), **torch_optimizer_tensors(opt, names)}, gen)
        if progress:
            progress(sched.event(JOINT, seed, epoch, epoch_loss, sc))
        if done:
            break
    if any(not o.best.is_file() for o in bests.values()):  # zero epochs: save the initial models
        sched.start_from(score())
        for m, dom in zip(models, targets):
            bests[dom].save_best(m.tensors(), 0, sched.per_domain[dom])
    return loop.joint_results(TARGET, seed, sched, {dom: bests[dom].best for dom in targets}, timer)


def run_seed(
    cfg: GaMtcdrConfig, data: Dataset, run_dir: Path, seed: int, targets: list[str], *, resume=False, progress=None
) -> list[loop.SeedResult]:
    """Both stages for one seed: the graph embedding of every domain, then the joint model over ``targets``."""
    walks = [run_walks(cfg, data, run_dir, seed, d, resume=resume, progress=progress) for d in data.domains]
    return [*walks, *run_joint(cfg, data, run_dir, seed, targets, resume=resume, progress=progress)]
