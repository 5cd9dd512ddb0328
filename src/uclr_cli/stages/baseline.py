"""Single-domain baselines of the paper's Table 2, trained on one domain's train interactions.

* ``bprmf``: BPR-MF (a single-domain model, not the global PGE) with PGE's
  options: item bias, L2 per role, a row-wise optimizer;
* ``neumf``: NeuMF, binary log loss on each positive and ``negatives`` sampled
  negatives; with ``pretrain_towers`` GMF and MLP are trained alone first
  (their own checkpoints ``baseline-gmf-<d>``/``baseline-mlp-<d>``) and NeuMF
  starts from them with the output layer [α·h_gmf, (1-α)·h_mlp], α = 0.5.
  Embeddings get sparse gradients and row-wise Adam, the layers Adam;
* ``lightgcn``: LightGCN, BPR on the propagated embeddings + L2 on the batch's
  ego embeddings, Adam.

Negatives come from domain d (uniform, by popularity or a mix; collisions
with the user's train items redrawn), ``n_negatives`` per positive, as in PGE.
The rules are those of the other stages: checkpoint
``seed-<s>/baseline-<name>-<domain>.safetensors`` (best epoch on the domain's
validation NDCG@10), per-epoch resume state with optimizer and generator,
early stopping, refusal of another stage, dataset or shape on load.
Under ``torchrun`` the loop is data-parallel (``world``, :mod:`uclr_cli.distributed`), as pretrain's:
every rank draws the negatives of the whole global batch, computes the loss of its share divided by the
global batch size, and the gradients are summed (for the row-wise tables only the rows the global batch
touches); rank 0 writes the files.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from uclr_cli import distributed, layout, loop
from uclr_cli.config import BASELINE_OPTIONS, ROWWISE, BaselineConfig
from uclr_cli.data.dataset import Dataset, sha256_file
from uclr_cli.errors import CheckpointError
from uclr_cli.models.baselines import NeuMF, SingleDomainModel
from uclr_cli.optim import BPRRowStep, RowAdam, load_torch_optimizer_tensors, torch_optimizer_tensors
from uclr_cli.sampling import NegativeSampler
from uclr_cli.trained import baseline_valid_score, build_baseline, load_baseline

#: NeuMF's towers, trained alone first with ``pretrain_towers``
TOWERS = ("gmf", "mlp")
#: weight of the GMF tower in the output layer of a NeuMF started from its towers (He et al., 2017)
ALPHA = 0.5
#: model-specific options each kind reads (the rest of BaselineConfig is shared)
_ROLE_REGS = ("reg_user", "reg_pos", "reg_neg")
_OWN = {
    "bprmf": (*_ROLE_REGS, "item_bias", "optimizer"),
    "lightgcn": (*_ROLE_REGS, "layers"),
    "neumf": ("mlp_layers", "pretrain_towers"),
    "gmf": (),
    "mlp": ("mlp_layers",),
}
_KINDS = tuple(_OWN)


def stage_name(kind: str) -> str:
    return f"baseline-{kind}"


def model_config(cfg: BaselineConfig, kind: str) -> dict:
    """The part of ``cfg`` that ``kind`` reads: what its checkpoints record and what resume checks."""
    skip = {"data", "run", "seeds", "domain", "model", *(set(BASELINE_OPTIONS) - set(_OWN[kind]))}
    return {"model": kind, **cfg.model_dump(mode="json", exclude=skip), "n_negatives": cfg.negatives_per_positive(kind)}


class _Optimizers:
    """The optimizers of one kind, saved and restored as named tensors.

    BPRMF: the fused row-wise BPR step (``optimizer``). NeuMF and towers: row-wise Adam
    on the embedding tables (sparse gradients) + Adam on the layers.
    LightGCN: Adam on the ego tables (propagation touches every row).
    """

    def __init__(self, kind: str, model: SingleDomainModel, cfg: BaselineConfig):
        self.kind, self.row, self.dense, self.names, self.tables = kind, None, None, [], {}
        if kind == "bprmf":
            kind_ = ROWWISE[cfg.optimizer]
            regs = cfg.role_regs()
            self.row = BPRRowStep(
                model.emb.data, model.n_users, cfg.lr, regs, kind=kind_, fixed_last_user_col=cfg.item_bias
            )
        elif kind == "lightgcn":
            self.names = ["user_emb", "item_emb"]
            self.dense = torch.optim.Adam([model.user_emb, model.item_emb], lr=cfg.lr)
        else:
            emb = model.embedding_names()
            self.tables = {n: getattr(model, n) for n in emb}
            self.row = RowAdam({n: p.data for n, p in self.tables.items()}, lr=cfg.lr)
            named = [(n, p) for n, p in model.named_parameters() if n not in emb]
            self.names = [n for n, _ in named]
            self.dense = torch.optim.Adam([p for _, p in named], lr=cfg.lr)

    def zero_grad(self) -> None:
        if self.dense is not None:
            self.dense.zero_grad(set_to_none=True)
        for p in self.tables.values():
            p.grad = None

    def step(self, world: distributed.World = distributed.SINGLE, rows: dict[str, torch.Tensor] | None = None) -> None:
        """After ``backward``: row-wise Adam on the rows with (sparse) gradients, Adam on the rest.

        Data-parallel: ``rows[name]`` are the sorted unique rows of each table that the global batch touches
        (the same on every rank, and the rows one process's gradient has). Each rank puts its sparse gradient
        into those rows, and they are summed over the ranks (only they cross the network); the dense
        gradients are summed whole."""
        if self.tables:
            updates = {}
            for n, p in self.tables.items():
                if world.size > 1:
                    g = torch.zeros(len(rows[n]), p.shape[1], dtype=p.dtype, device=p.device)
                    if p.grad is not None:  # None: an empty share
                        c = p.grad.coalesce()
                        g.index_add_(0, torch.searchsorted(rows[n], c.indices()[0]), c.values())
                    updates[n] = (rows[n], world.sum_(g))
                elif p.grad is not None:
                    g = p.grad.coalesce()  # unique rows, duplicate rows summed
                    updates[n] = (g.indices()[0], g.values())
            self.row.step(updates)
        if self.dense is not None:
            world.sum_grads([p for group in self.dense.param_groups for p in group["params"]])  # one process: no-op
            self.dense.step()
        self.zero_grad()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.row is not None:
            out.update({f"row{k}": v for k, v in self.row.state_tensors().items()})  # rowopt.*: apart from Adam's opt.*
        if self.dense is not None:
            out.update(torch_optimizer_tensors(self.dense, self.names))
        return out

    def load_state_tensors(self, t: dict[str, torch.Tensor]) -> None:
        if self.row is not None:
            self.row.load_state_tensors({k[3:]: v for k, v in t.items() if k.startswith("rowopt.")})
        if self.dense is not None:
            load_torch_optimizer_tensors(self.dense, self.names, t)


def run_domain(
    cfg: BaselineConfig,
    data: Dataset,
    run_dir: Path,
    seed: int,
    domain: str,
    *,
    kind: str | None = None,
    resume: bool = False,
    progress: loop.Progress | None = None,
    world: distributed.World = distributed.SINGLE,
) -> loop.SeedResult:
    """Train baseline ``kind`` (default ``cfg.model``) for one seed on one domain.

    Writes ``seed-<s>/baseline-<kind>-<domain>.safetensors`` (best epoch on
    the domain's validation NDCG@10) and its per-epoch resume state (rank 0 of ``world`` only).
    """
    kind = kind or cfg.model
    if kind not in _KINDS:
        raise ValueError(f"unknown baseline {kind!r}")
    device = distributed.device_for(loop.resolve_device(cfg.device))
    d = data.domain_index(domain)
    domain = data.domains[d]
    lo, hi = data.item_offsets[d], data.item_offsets[d + 1]
    stage = stage_name(kind)
    config = model_config(cfg, kind)
    out = loop.Outputs.of(stage, data, run_dir, seed, layout.baseline_name(kind, domain), config)
    out_dir = out.best.parent
    timer = loop.Timer()

    towers: dict[str, str] = {}
    if kind == "neumf" and cfg.pretrain_towers:  # GMF and MLP alone first, each with its own checkpoint
        for t in TOWERS:
            run_domain(cfg, data, run_dir, seed, domain, kind=t, resume=resume, progress=progress, world=world)
        world.sum_(torch.zeros(1, device=device))  # a barrier: rank 0 has written the towers' files
        for t in TOWERS:
            towers[t] = sha256_file(out_dir / layout.baseline_name(t, domain))
    k = _KINDS.index(kind)
    init_gen = torch.Generator().manual_seed(seed * 7919 + 101 * d + k)
    model = build_baseline(kind, config, data, d, device, init_gen)
    if towers:
        model.init_from_towers(*(load_baseline(out_dir, t, data, domain, device) for t in TOWERS), alpha=ALPHA)
    opt = _Optimizers(kind, model, cfg)
    gen = loop.generator(device, seed, 100 + 8 * d + k)
    out.meta = dict(domain=domain, dim=cfg.dim, n_users=data.n_users, item_offset=lo, n_items=hi - lo)
    if towers:
        out.meta["towers_sha256"] = towers

    def score() -> dict[str, float]:
        model.eval()
        return {domain: baseline_valid_score(model, data, domain)}

    sched = loop.Schedule(cfg.epochs, cfg.patience, cfg.eval_every)
    # every rank reads rank 0's safetensors resume state, if rank 0 sees one
    if resume and world.rank0s(out.state.is_file(), device):
        expect = {"domain": domain, "towers_sha256": towers or None}
        t = out.load_state(sched, gen, expect=expect)
        try:
            model.load_tensors({n: t[n] for n in model.tensors()})
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"resume state does not match the model ({e})", out.state) from None
        opt.load_state_tensors(t)

    sel = data.train_domain == d
    tu, ti = data.train_user[sel].to(device), data.train_item[sel].to(device)
    td = torch.full_like(tu, d)  # NeuMF's negatives
    sampler = NegativeSampler(data, device, cfg.negatives, cfg.pop_share)
    n_neg = cfg.negatives_per_positive(kind)
    n = len(tu)
    for epoch in sched.epochs_to_run():
        t0 = loop.Timer()
        perm = torch.randperm(n, generator=gen, device=device)
        total = torch.zeros((), device=device)
        model.train()
        for s in range(0, n, cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            u, i = tu[idx], ti[idx]
            if kind in ("bprmf", "lightgcn") and n_neg > 1:  # one BPR pair per negative
                u, i = u.repeat_interleave(n_neg), i.repeat_interleave(n_neg)
            p0, p1 = world.part(len(u))  # this rank's share (the whole batch in one process)
            share = (p1 - p0) / len(u)  # its part of the global batch's mean
            if kind == "bprmf":
                j = sampler(u, torch.full_like(u, d), gen)  # for the whole global batch: alike on every rank
                if world.size > 1:  # the fused row-wise step sums the touched rows' gradients (as pretrain's)
                    loss = opt.row.step(u, i - lo, j - lo, part=(p0, p1), reduce=world.sum_)
                else:
                    loss = opt.row.step(u, i - lo, j - lo)
            elif kind == "lightgcn":
                j = sampler(u, torch.full_like(u, d), gen)
                loss = torch.zeros((), device=device)
                if p1 > p0:
                    loss = model.objective(u[p0:p1], i[p0:p1] - lo, j[p0:p1] - lo, cfg.role_regs())
                    if share != 1:
                        loss = loss * share
                    loss.backward()
                opt.step(world)
            else:  # NeuMF and its towers: log loss on the positive and `n_neg` negatives of each row
                j = sampler(u.repeat_interleave(n_neg), td[idx].repeat_interleave(n_neg), gen)
                loss = neumf_step(model, opt, u, i, j, cfg.reg, world)
            total += loss.detach() * len(idx)
        epoch_loss = float(world.sum_(total)) / max(n, 1)  # a host sync: the epoch's training is done
        sched.trained(n, t0.elapsed())
        loop.check_finite(epoch_loss, f"{stage} {domain}", seed, epoch)
        sc, improved = sched.validate(epoch, score)
        if improved and world.main:
            out.save_best(model.tensors(), epoch, sched.best)
        done = sched.done(epoch)
        if world.main:
            out.save_state(sched, epoch, done, {**model.tensors(), **opt.state_tensors()}, gen)
        if progress:
            progress(sched.event(f"{stage} {domain}", seed, epoch, epoch_loss, sc))
        if done:
            break

    if world.main and not out.best.is_file():  # zero epochs: save the initial model
        sched.start_from(score())
        out.save_best(model.tensors(), 0, sched.best)
    return sched.result(f"{stage} {domain}", seed, out.best, timer, {domain: sched.best}, {"domain": domain})


def neumf_step(
    model: NeuMF,
    opt: _Optimizers,
    u: torch.Tensor,
    i: torch.Tensor,
    j: torch.Tensor,
    reg: float,
    world: distributed.World,
) -> torch.Tensor:
    """One step of NeuMF (or a tower) on a global batch: positives ``(u, i)`` and each row's negatives ``j``
    (``len(j) / len(u)`` per row, in row order). Each rank takes its share of the rows, its loss divided by
    the global batch; the optimizers sum the gradients over the ranks. Returns the share's part of the loss."""
    n_neg = len(j) // len(u)
    p0, p1 = world.part(len(u))  # the whole batch in one process
    loss = torch.zeros((), device=u.device)
    if p1 > p0:
        uu = u[p0:p1].repeat_interleave(n_neg)
        loss = neumf_objective(model, u[p0:p1], i[p0:p1], uu, j[p0 * n_neg : p1 * n_neg], reg)
        if p1 - p0 < len(u):
            loss = loss * ((p1 - p0) / len(u))
        loss.backward()
    rows = None
    if world.size > 1:  # the rows of each table the global batch touches
        user_rows, item_rows = torch.unique(u), torch.unique(torch.cat([i, j]) - model.item_offset)
        rows = {name: user_rows if name.endswith("_user") else item_rows for name in opt.tables}
    opt.step(world, rows)
    return loss


def neumf_objective(
    model: NeuMF, u: torch.Tensor, i: torch.Tensor, uu: torch.Tensor, j: torch.Tensor, reg: float
) -> torch.Tensor:
    """Binary log loss over positives (u, i) and negatives (uu, j), averaged over all pairs, + λ·L2 of the rows used."""
    pos, sq_pos = model(u, i)
    neg, sq_neg = model(uu, j)
    n = pos.numel() + neg.numel()
    loss = (F.softplus(-pos).sum() + F.softplus(neg).sum()) / n  # -log σ(pos) and -log(1-σ(neg))
    if reg:
        loss = loss + reg * (sq_pos.sum() + sq_neg.sum()) / n
    return loss
