"""Domain-aware LoRA finetuning of the whole framework on one domain (paper §3.5).

W = W0 + (α/r)·B·A with W0 the frozen PGE user table; users are scored with
Dec(Enc(W)) against domain d's items. Loss: BPR on domain d's train
interactions + the combined contrastive and reconstruction loss on W.
Which further parts train (autoencoder, τ, domain d's items) is an option.
Epoch 0 is the starting model (== the contrast model): if no epoch beats it on
validation, the saved adapter is the zero one, and the summary says so.
Under ``torchrun`` the loop is data-parallel (``world``, :mod:`uclr_cli.distributed`): every rank draws the
negatives and the contrast users of the whole global batch, computes the loss of its share of both, and the
gradients are summed; τ and u are updated for the whole contrast batch on every rank. Rank 0 writes the files.
"""

from __future__ import annotations

from pathlib import Path

import torch

from uclr_cli import distributed, layout, loop
from uclr_cli.config import FinetuneConfig
from uclr_cli.contrastive import combined_loss
from uclr_cli.data.dataset import Dataset, sha256_file
from uclr_cli.errors import ConfigError
from uclr_cli.losses import bpr_objective
from uclr_cli.models.autoencoder import ae_tensors, learned_columns, load_ae, with_fixed_column
from uclr_cli.models.lora import LoRAEmbedding
from uclr_cli.optim import load_torch_optimizer_tensors, torch_optimizer_tensors
from uclr_cli.sampling import NegativeSampler
from uclr_cli.trained import load_contrast, load_pretrain

STAGE = "finetune"


def run_domain(
    cfg: FinetuneConfig,
    data: Dataset,
    run_dir: Path,
    seed: int,
    domain: str,
    *,
    resume: bool = False,
    progress: loop.Progress | None = None,
    world: distributed.World = distributed.SINGLE,
) -> loop.SeedResult:
    """Finetune one seed on one domain; writes ``finetune-<domain>.safetensors`` (rank 0 of ``world`` only)."""
    device = distributed.device_for(loop.resolve_device(cfg.device))
    d = data.domain_index(domain)
    config = cfg.model_dump(mode="json", exclude={"data", "run", "seeds", "domain"})
    out = loop.Outputs.of(STAGE, data, run_dir, seed, layout.finetune_name(domain), config)
    pre_path = loop.require(out.best.parent / layout.PRETRAIN, "pretrain checkpoint")
    con_path = loop.require(out.best.parent / layout.CONTRAST["individual"], "contrast checkpoint")
    timer = loop.Timer()

    users_e, items_e, pre_meta = load_pretrain(pre_path, data)
    fixed = bool(pre_meta.get("item_bias"))  # the adapter and the AE act on the learned columns only
    users_e = learned_columns(users_e, fixed)
    if cfg.rank > users_e.shape[1]:
        raise ConfigError(f"rank {cfg.rank} is larger than the embedding size {users_e.shape[1]}", "--rank")
    pre_sha, con_sha = sha256_file(pre_path), sha256_file(con_path)
    ae, temps, ccfg, _ = load_contrast(con_path, data, pre_sha, device)
    lo, hi = data.item_offsets[d], data.item_offsets[d + 1]
    items = items_e.to(device).clone()
    dom_items = torch.nn.Parameter(items[lo:hi].clone(), requires_grad=cfg.train_items)
    gen = loop.generator(device, seed, 3 + d)
    init_gen = torch.Generator(device="cpu").manual_seed(seed * 7919 + d)
    lora = LoRAEmbedding(users_e, cfg.rank, cfg.lora_alpha or float(cfg.rank), gen=init_gen).to(device)
    ae.requires_grad_(cfg.train_ae)
    params = {"lora.a": lora.lora_a, "lora.b": lora.lora_b}
    if cfg.train_ae:
        params.update({f"ae.{k}": p for k, p in ae.named_parameters()})
    if cfg.train_items:
        params["items"] = dom_items
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    out.meta = dict(
        domain=domain, rank=cfg.rank, dim=users_e.shape[1], pretrain_sha256=pre_sha, contrast_sha256=con_sha
    )

    def item_table() -> torch.Tensor:
        return torch.cat([items[:lo], dom_items.detach(), items[hi:]])

    def score() -> dict[str, float]:
        with torch.no_grad():
            rep = with_fixed_column(ae(lora.weight()), fixed)
            return loop.valid_scores(data, rep, item_table(), data.valid, [domain])

    def trained_tensors() -> dict[str, torch.Tensor]:
        """What the finetune checkpoint holds: the adapter and every part that trains."""
        out = {"lora_a": lora.lora_a, "lora_b": lora.lora_b}
        if cfg.train_ae:
            out.update(ae_tensors(ae))
        if cfg.train_items:
            out["domain_items"] = dom_items
        if cfg.train_tau:
            out.update(temps.tensors())
        return out

    sched = loop.Schedule(cfg.epochs, cfg.patience, cfg.eval_every)
    # every rank reads rank 0's safetensors resume state (a small model: no DCP), if rank 0 sees one
    if resume and world.rank0s(out.state.is_file(), device):
        t = out.load_state(sched, gen, expect={"contrast_sha256": con_sha, "domain": domain})
        loop.restore(t, {"lora_a": lora.lora_a, "lora_b": lora.lora_b}, out.state)
        if cfg.train_ae:
            load_ae(ae, t)
        if cfg.train_items:
            loop.restore(t, {"domain_items": dom_items}, out.state)
        # log u moves every step even when τ does not train: the state always holds it
        temps.load(t)
        load_torch_optimizer_tensors(opt, list(params), t)
    else:
        sched.start_from(score())
        if world.main:
            out.save_best(trained_tensors(), 0, sched.best)  # the zero adapter: exactly the contrast model

    sel = data.train_domain == d
    tu, ti = data.train_user[sel].to(device), data.train_item[sel].to(device)
    td = torch.full_like(tu, d)
    sampler = NegativeSampler(data, device)
    n = len(tu)
    for epoch in sched.epochs_to_run():
        t0 = loop.Timer()
        perm = torch.randperm(n, generator=gen, device=device)
        total = torch.zeros((), device=device)
        for s in range(0, n, cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            u, i = tu[idx], ti[idx]
            j = sampler(u, td[idx], gen)  # for the whole global batch: the same draws on every rank
            p0, p1 = world.part(len(u))  # this rank's share (the whole batch in one process)
            loss = torch.zeros((), device=device)
            if p1 > p0:
                u, i, j = u[p0:p1], i[p0:p1], j[p0:p1]
                rep = with_fixed_column(ae(lora.rows(u)), fixed)
                pi = dom_items[i - lo] if cfg.train_items else items[i]
                pj = dom_items[j - lo] if cfg.train_items else items[j]
                loss = bpr_objective(rep, pi, pj, cfg.reg)
                if p1 - p0 < len(idx):  # its part of the global batch's mean
                    loss = loss * ((p1 - p0) / len(idx))
            value = loss.detach()
            step = None
            if cfg.contrast_weight > 0:
                b = torch.randperm(data.n_users, generator=gen, device=device)[: cfg.contrast_users or cfg.batch_size]
                part = world.part(len(b)) if world.size > 1 else None  # its anchors (see stages/contrast.py)
                obj, val, step = combined_loss(ae, lora.rows(b), b, temps, ccfg, gen, False, part)
                loss = loss + cfg.contrast_weight * obj
                value = value + cfg.contrast_weight * val
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad:  # not when both shares are empty
                loss.backward()
            world.sum_grads(list(params.values()))  # a no-op in one process
            opt.step()
            if step is not None:
                temps.update(b, step.log_u, step.grad_tau, train_tau=cfg.train_tau)
            total += value * len(idx)
        epoch_loss = float(world.sum_(total)) / max(n, 1)  # a host sync: the epoch's training is done
        sched.trained(n, t0.elapsed())
        loop.check_finite(epoch_loss, f"{STAGE} {domain}", seed, epoch)
        sc, improved = sched.validate(epoch, score)
        if improved and world.main:
            out.save_best(trained_tensors(), epoch, sched.best)
        done = sched.done(epoch)
        if world.main:
            tensors = {**trained_tensors(), **temps.tensors(), **torch_optimizer_tensors(opt, list(params))}
            out.save_state(sched, epoch, done, tensors, gen)
        if progress:
            progress(sched.event(f"{STAGE} {domain}", seed, epoch, epoch_loss, sc))
        if done:
            break
    return sched.result(f"{STAGE} {domain}", seed, out.best, timer, extra={"domain": domain})
