"""The contrastive dual-stream autoencoder on the frozen PGE user table (paper §3.4).

Stream 1 encodes E, stream 2 a masked copy E'; one set of weights serves
both. ``temperature`` picks the variant: ``individual`` (UCL-AE, one τ per
user), ``global`` (CL-AE, one learnable τ), ``none`` (plain AE, reconstruction
only, single stream). Users are scored with Dec(Enc(E)) against the PGE items.
Under ``torchrun`` the loop is data-parallel (``world``, :mod:`uclr_cli.distributed`): every rank encodes
the whole global batch and draws its whole mask, takes the loss terms of its share of the anchors, and the
gradients are summed; τ and u are updated for the whole batch on every rank. Rank 0 writes the files.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from uclr_cli import checkpoint as ckpt
from uclr_cli import distributed, layout, loop
from uclr_cli.config import ContrastConfig
from uclr_cli.contrastive import TemperatureState, combined_loss
from uclr_cli.data.dataset import Dataset, sha256_file
from uclr_cli.data.split import DEFAULT_BUCKETS, bucket_index, bucket_labels
from uclr_cli.models.autoencoder import AutoEncoder, ae_tensors, learned_columns, load_ae, with_fixed_column
from uclr_cli.optim import load_torch_optimizer_tensors, torch_optimizer_tensors
from uclr_cli.trained import load_pretrain

STAGE = "contrast"


def tau_by_bucket(tau: torch.Tensor, data: Dataset, edges=DEFAULT_BUCKETS) -> dict[str, float]:
    """Mean τ of users grouped by their train interactions over all domains."""
    if tau.numel() == 1:
        return {"all": float(tau)}
    counts = data.train_counts.sum(0).numpy()
    b = bucket_index(counts, edges)
    t = tau.cpu().numpy()
    return {lab: float(t[b == i].mean()) if (b == i).any() else math.nan for i, lab in enumerate(bucket_labels(edges))}


def run_seed(
    cfg: ContrastConfig,
    data: Dataset,
    run_dir: Path,
    seed: int,
    *,
    resume: bool = False,
    progress: loop.Progress | None = None,
    world: distributed.World = distributed.SINGLE,
) -> loop.SeedResult:
    """Train one seed's autoencoder; writes ``contrast[-variant].safetensors`` (best on valid; rank 0 of
    ``world`` only)."""
    device = distributed.device_for(loop.resolve_device(cfg.device))
    config = cfg.model_dump(mode="json", exclude={"data", "run", "seeds"})
    out = loop.Outputs.of(STAGE, data, run_dir, seed, layout.CONTRAST[cfg.temperature], config)
    pre_path = loop.require(out.best.parent / layout.PRETRAIN, "pretrain checkpoint")
    timer = loop.Timer()

    users_e, items_e, pre_meta = load_pretrain(pre_path, data)
    fixed = bool(pre_meta.get("item_bias"))  # the users' bias column is a constant: not the AE's to learn
    pre_sha = sha256_file(pre_path)
    E, items = learned_columns(users_e, fixed).to(device), items_e.to(device)
    dim = E.shape[1]
    torch.manual_seed(seed)
    ae = AutoEncoder(dim, cfg.hidden).to(device)
    params = list(ae.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    opt_names = [f"ae.{k}" for k, _ in ae.named_parameters()]
    temps = TemperatureState(data.n_users, cfg, device)
    gen = loop.generator(device, seed, 2)
    out.meta = dict(dim=dim, hidden=cfg.hidden, temperature=cfg.temperature, pretrain_sha256=pre_sha)

    def score() -> dict[str, float]:
        with torch.no_grad():
            return loop.valid_scores(data, with_fixed_column(ae(E), fixed), items, data.valid)

    def save_best(epoch: int) -> None:
        if world.main:
            out.save_best({**ae_tensors(ae), **temps.tensors()}, epoch, sched.best)

    sched = loop.Schedule(cfg.epochs, cfg.patience, cfg.eval_every)
    # every rank reads rank 0's safetensors resume state (a small model: no DCP), if rank 0 sees one
    if resume and world.rank0s(out.state.is_file(), device):
        t = out.load_state(sched, gen, expect={"pretrain_sha256": pre_sha})
        load_ae(ae, t)
        temps.load(t)
        load_torch_optimizer_tensors(opt, opt_names, t)

    n = data.n_users
    for epoch in sched.epochs_to_run():
        t0 = loop.Timer()
        perm = torch.randperm(n, generator=gen, device=device)
        total = torch.zeros((), device=device)
        for s in range(0, n, cfg.batch_size):
            b = perm[s : s + cfg.batch_size]
            if len(b) < 2:  # a contrast needs at least one negative
                continue
            part = world.part(len(b)) if world.size > 1 else None  # this rank's anchors (all in one process)
            opt.zero_grad(set_to_none=True)
            objective, value, step = combined_loss(ae, E[b], b, temps, cfg, gen, epoch == 1, part)
            if objective.requires_grad:  # not on an empty share
                objective.backward()
            world.sum_grads(params)  # a no-op in one process
            opt.step()
            if step is not None:
                temps.update(b, step.log_u, step.grad_tau)
            total += value * len(b)
        epoch_loss = float(world.sum_(total)) / n  # a host sync: the epoch's training is done
        sched.trained(n, t0.elapsed())
        loop.check_finite(epoch_loss, STAGE, seed, epoch)
        sc, improved = sched.validate(epoch, score)
        if improved:
            save_best(epoch)
        done = sched.done(epoch)
        if world.main:
            tensors = {**ae_tensors(ae), **temps.tensors(), **torch_optimizer_tensors(opt, opt_names)}
            out.save_state(sched, epoch, done, tensors, gen)
        if progress:
            extra = {"tau_mean": f"{float(temps.tau.mean()):.4f}"} if cfg.temperature != "none" else {}
            progress(sched.event(STAGE, seed, epoch, epoch_loss, sc, extra))
        if done:
            break
    extra = {"variant": cfg.temperature}
    if not world.main:  # rank 0 may still be writing: the other ranks report nothing
        return sched.result(STAGE, seed, out.best, timer, extra=extra)
    if not out.best.is_file():  # zero epochs: the untrained autoencoder
        sched.start_from(score())
        save_best(0)
    best_t, _ = ckpt.load(out.best, stage=STAGE, fingerprint=data.fingerprint)
    if cfg.temperature != "none":
        tau = best_t["tau"]
        extra["tau_by_bucket"] = tau_by_bucket(tau, data)
        extra["tau_min_max"] = (float(tau.min()), float(tau.max()))
        at_bounds = (tau <= cfg.tau_min * (1 + 1e-6)) | (tau >= cfg.tau_max * (1 - 1e-6))
        extra["tau_at_bounds"] = float(at_bounds.float().mean())
    return sched.result(STAGE, seed, out.best, timer, extra=extra)
