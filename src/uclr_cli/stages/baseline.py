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
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from uclr_cli import layout, loop
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

    def step(self) -> None:
        """After ``backward``: row-wise Adam on the rows with (sparse) gradients, Adam on the rest."""
        if self.tables:
            updates = {}
            for n, p in self.tables.items():
                if p.grad is not None:
                    g = p.grad.coalesce()  # unique rows, duplicate rows summed
                    updates[n] = (g.indices()[0], g.values())
            self.row.step(updates)
        if self.dense is not None:
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
) -> loop.SeedResult:
    """Train baseline ``kind`` (default ``cfg.model``) for one seed on one domain.

    Writes ``seed-<s>/baseline-<kind>-<domain>.safetensors`` (best epoch on
    the domain's validation NDCG@10) and its per-epoch resume state.
    """
    kind = kind or cfg.model
    if kind not in _KINDS:
        raise ValueError(f"unknown baseline {kind!r}")
    device = loop.resolve_device(cfg.device)
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
            run_domain(cfg, data, run_dir, seed, domain, kind=t, resume=resume, progress=progress)
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
    if resume and out.state.is_file():
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
            if kind == "bprmf":
                j = sampler(u, torch.full_like(u, d), gen)
                loss = opt.row.step(u, i - lo, j - lo)
            elif kind == "lightgcn":
                j = sampler(u, torch.full_like(u, d), gen)
                loss = model.objective(u, i - lo, j - lo, cfg.role_regs())
                loss.backward()
                opt.step()
            else:  # NeuMF and its towers: log loss on the positive and `n_neg` negatives of each row
                uu = u.repeat_interleave(n_neg)
                j = sampler(uu, td[idx].repeat_interleave(n_neg), gen)
                loss = neumf_objective(model, u, i, uu, j, cfg.reg)
                loss.backward()
                opt.step()
            total += loss.detach() * len(idx)
        epoch_loss = float(total) / max(n, 1)  # a host sync: the epoch's training is done
        sched.trained(n, t0.elapsed())
        loop.check_finite(epoch_loss, f"{stage} {domain}", seed, epoch)
        sc, improved = sched.validate(epoch, score)
        if improved:
            out.save_best(model.tensors(), epoch, sched.best)
        done = sched.done(epoch)
        tensors = {**model.tensors(), **opt.state_tensors()}
        out.save_state(sched, epoch, done, tensors, gen)
        if progress:
            progress(sched.event(f"{stage} {domain}", seed, epoch, epoch_loss, sc))
        if done:
            break

    if not out.best.is_file():  # zero epochs: save the initial model
        sched.start_from(score())
        out.save_best(model.tensors(), 0, sched.best)
    return sched.result(f"{stage} {domain}", seed, out.best, timer, {domain: sched.best}, {"domain": domain})


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
