"""CAT-ART (Li et al., WSDM 2023), a multi-target cross-domain baseline of the paper's Table 2, in three stages.

1. ``run_mf``: BPR-MF per domain on its train rows (one uniform same-domain
   negative; L2 ``reg`` on the batch's rows; row-wise Adam), best epoch on the
   domain's validation NDCG@10: ``seed-<s>/baseline-cat-art-mf-<domain>``.
2. ``run_cat``: CAT, the contrastive autoencoder on the concatenated frozen
   stage-1 user tables (every user), stopped on its training loss (it has no
   ranking to validate): ``seed-<s>/baseline-cat-art-cat``.
3. ``run_art``: ART per target domain, from the stage-1 tables and the frozen
   CAT encoder, BPR with dense Adam, best epoch on validation NDCG@10:
   ``seed-<s>/baseline-cat-art-<domain>``, scored by ``uclr evaluate``.

A user "has" a domain when it has train rows there (validation and test rows
never count); elsewhere CAT and ART read a pad vector. Every stage writes its
best checkpoint and a per-epoch resume state (optimizer, generator); each
later stage records and checks the sha256 of the checkpoints it was built from.

Under ``torchrun`` every stage is data-parallel (``world``, :mod:`uclr_cli.distributed`): every rank draws
the permutation, negatives, CAT's augmented blocks and ART's dropout of the whole global batch, takes the
loss of its share divided by the global batch size, and the gradients are summed (stage 1: the fused
row-wise step over the touched rows; CAT encodes the whole batch for its in-batch negatives). Rank 0
writes the files; the ranks wait for them before a later stage reads them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from uclr_cli import checkpoint as ckpt
from uclr_cli import distributed, layout, loop
from uclr_cli.config import CatArtConfig
from uclr_cli.data.dataset import Dataset, sha256_file
from uclr_cli.errors import CheckpointError
from uclr_cli.models import load_weights
from uclr_cli.models.cat_art import CatAutoEncoder
from uclr_cli.optim import BPRRowStep, load_torch_optimizer_tensors, torch_optimizer_tensors
from uclr_cli.sampling import NegativeSampler
from uclr_cli.trained import baseline_valid_score, build_baseline, load_baseline

MF, CAT, ART = "baseline-cat-art-mf", "baseline-cat-art-cat", "baseline-cat-art"
_MF_KEYS = ("dim", "reg", "init_std", "batch_size", "lr", "epochs", "patience", "eval_every")
_CAT_KEYS = ("cat_epochs", "cat_patience", "cat_batch_size", "cat_lr", "temperature", "cl_weight", "rec_weight")


def stage_configs(cfg: CatArtConfig) -> dict[str, dict]:
    """What each stage reads of ``cfg`` (recorded in its checkpoints, checked on resume)."""
    dump = cfg.model_dump(mode="json")
    mf = {"model": "cat-art-mf", **{k: dump[k] for k in _MF_KEYS}}
    cat = {"model": "cat-art-cat", "dim": cfg.dim, **{k: dump[k] for k in _CAT_KEYS}}
    art = {"model": "cat-art", **{k: dump[k] for k in (*_MF_KEYS, "dropout")}}
    return {MF: mf, CAT: cat, ART: art}


def check_names(data: Dataset) -> None:
    """Refuse domains whose CAT-ART checkpoints would be one file (``x`` and ``mf-x``; ``cat``), before any write."""
    fixed = {layout.CAT_ART_CAT: "CAT-ART's CAT stage"}
    layout.check_distinct(data.domains, ("cat-art-mf", "cat-art"), fixed, data.path)


def has_train_rows(data: Dataset, device) -> torch.Tensor:
    """(N, U) bool: user u has train rows in domain d (valid and test rows do not count)."""
    has = torch.zeros(len(data.domains), data.n_users, dtype=torch.bool, device=device)
    has[data.train_domain.to(device).long(), data.train_user.to(device).long()] = True
    return has


def _fit(
    out: loop.Outputs,
    sched: loop.Schedule,
    gen: torch.Generator,
    n: int,
    batch_size: int,
    step: Callable[[torch.Tensor], torch.Tensor],
    best: Callable[[], dict[str, torch.Tensor]],
    state: Callable[[], dict[str, torch.Tensor]],
    score: Callable[[float], dict[str, float]],
    label: str,
    progress: loop.Progress | None,
    by_loss: bool = False,
    world: distributed.World = distributed.SINGLE,
) -> None:
    """The epoch loop the three stages share: shuffled batches of ``n`` rows, ``step`` each
    (it returns the batch's mean loss, data-parallel this rank's part of it), validation by
    ``score(epoch loss)``, best checkpoint, resume state (rank 0 writes).
    ``by_loss``: ``score`` is the negated loss (CAT), and progress reports the lowest loss, not a validation score."""
    device = gen.device
    for epoch in sched.epochs_to_run():
        t0 = loop.Timer()
        perm = torch.randperm(n, generator=gen, device=device)
        total = torch.zeros((), device=device)
        for s in range(0, n, batch_size):
            idx = perm[s : s + batch_size]
            total += step(idx).detach() * len(idx)
        epoch_loss = float(world.sum_(total)) / max(n, 1)  # a host sync; the same bits on every rank (CAT stops on it)
        sched.trained(n, t0.elapsed())
        loop.check_finite(epoch_loss, label, out.seed, epoch)
        sc, improved = sched.validate(epoch, lambda: score(epoch_loss))
        if improved and world.main:
            out.save_best(best(), epoch, sched.best)
        done = sched.done(epoch)
        if world.main:
            out.save_state(sched, epoch, done, {**best(), **state()}, gen)
        if progress:
            progress(sched.event(label, out.seed, epoch, epoch_loss, sc, by_loss=by_loss))
        if done:
            break
    if world.main and not out.best.is_file():  # zero epochs: save the initial model
        sched.start_from(score(math.nan))
        out.save_best(best(), 0, sched.best)


def _descend(opt: torch.optim.Optimizer, loss: torch.Tensor) -> torch.Tensor:
    """One optimizer step on ``loss``; returns it."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def _descend_part(
    opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.Tensor], world: distributed.World
) -> torch.Tensor:
    """:func:`_descend` on this rank's part of the loss (no gradient: an empty share), the gradients of
    ``params`` summed over the ranks first; returns the part."""
    opt.zero_grad(set_to_none=True)
    if loss.requires_grad:
        loss.backward()
    world.sum_grads(params)
    opt.step()
    return loss


def _restore(out: loop.Outputs, sched: loop.Schedule, gen: torch.Generator, expect: dict, into: dict) -> dict:
    """Resume state: schedule, generator and the live tensors ``into``; returns the state's tensors."""
    t = out.load_state(sched, gen, expect=expect)
    loop.restore(t, into, out.state)
    return t


def run_mf(
    cfg: CatArtConfig,
    data: Dataset,
    run_dir: Path,
    seed: int,
    domain: str,
    *,
    resume=False,
    progress=None,
    world: distributed.World = distributed.SINGLE,
) -> loop.SeedResult:
    """Stage 1: BPR-MF on ``domain``'s train rows."""
    check_names(data)
    device = distributed.device_for(loop.resolve_device(cfg.device))
    d = data.domain_index(domain)
    domain, lo, hi = data.domains[d], data.item_offsets[d], data.item_offsets[d + 1]
    conf = stage_configs(cfg)[MF]
    out = loop.Outputs.of(MF, data, run_dir, seed, layout.baseline_name("cat-art-mf", domain), conf)
    out.meta = dict(domain=domain, dim=cfg.dim, n_users=data.n_users, item_offset=lo, n_items=hi - lo)
    timer, label = loop.Timer(), f"{MF} {domain}"
    model = build_baseline("cat-art-mf", conf, data, d, device, torch.Generator().manual_seed(seed * 7919 + 211 * d))
    opt = BPRRowStep(model.emb.data, model.n_users, cfg.lr, cfg.reg, kind="adam")
    gen = loop.generator(device, seed, 300 + d)
    sched = loop.Schedule(cfg.epochs, cfg.patience, cfg.eval_every)
    if resume and world.rank0s(out.state.is_file(), device):  # every rank reads rank 0's resume state
        t = _restore(out, sched, gen, {"domain": domain}, model.tensors())
        opt.load_state_tensors({k[len("row") :]: v for k, v in t.items() if k.startswith("rowopt.")})
    sel = data.train_domain == d
    tu, ti = data.train_user[sel].to(device), data.train_item[sel].to(device)
    sampler = NegativeSampler(data, device)

    def step(idx: torch.Tensor) -> torch.Tensor:
        u = tu[idx]
        j = sampler(u, torch.full_like(u, d), gen)  # for the whole global batch: alike on every rank
        if world.size > 1:  # the touched rows' gradients of the shares summed, as BPRMF's
            return opt.step(u, ti[idx] - lo, j - lo, part=world.part(len(u)), reduce=world.sum_)
        return opt.step(u, ti[idx] - lo, j - lo)

    _fit(
        out,
        sched,
        gen,
        len(tu),
        cfg.batch_size,
        step,
        model.tensors,
        lambda: {f"row{k}": v for k, v in opt.state_tensors().items()},
        lambda _loss: {domain: baseline_valid_score(model, data, domain)},
        label,
        progress,
        world=world,
    )
    return sched.result(label, seed, out.best, timer, {domain: sched.best}, {"domain": domain})


def stage1_tables(cfg: CatArtConfig, data: Dataset, seed_dir: Path, device):
    """(user tables (N, U, d), item tables per domain, {domain: sha256}) of the stage-1 checkpoints."""
    users, items, shas = [], [], {}
    for dom in data.domains:
        path = loop.require(seed_dir / layout.baseline_name("cat-art-mf", dom), f"baseline cat-art-mf {dom}")
        model = load_baseline(seed_dir, "cat-art-mf", data, dom, device)
        if model.user_emb.shape[1] != cfg.dim:
            raise CheckpointError(f"checkpoint has dim {model.user_emb.shape[1]}, expected {cfg.dim}", path)
        users.append(model.user_emb.detach())
        items.append(model.item_emb.detach())
        shas[dom] = sha256_file(path)
    return torch.stack(users), items, shas


def load_cat(path: Path, data: Dataset, mf_sha: dict, dim: int, device) -> CatAutoEncoder:
    """The CAT of a checkpoint, checked against the dataset and the stage-1 checkpoints it was built from."""
    t, _ = ckpt.load(path, stage=CAT, fingerprint=data.fingerprint, expect={"mf_sha256": mf_sha, "dim": dim})
    cat = CatAutoEncoder(len(data.domains), dim).to(device)
    try:
        load_weights(cat, t)
    except ValueError as e:
        raise CheckpointError(f"checkpoint does not match its model ({e})", path) from None
    return cat


def run_cat(
    cfg: CatArtConfig,
    data: Dataset,
    run_dir: Path,
    seed: int,
    *,
    resume=False,
    progress=None,
    world: distributed.World = distributed.SINGLE,
):
    """Stage 2: CAT on the frozen stage-1 user tables of every domain."""
    check_names(data)
    device = distributed.device_for(loop.resolve_device(cfg.device))
    sdir = layout.seed_dir(run_dir, seed)
    blocks, _, mf_sha = stage1_tables(cfg, data, sdir, device)
    blocks = blocks.transpose(0, 1).contiguous()  # (U, N, d)
    has = has_train_rows(data, device).T.contiguous()  # (U, N)
    conf = stage_configs(cfg)[CAT]
    out = loop.Outputs.of(CAT, data, run_dir, seed, layout.CAT_ART_CAT, conf)
    out.meta = dict(dim=cfg.dim, n_domains=len(data.domains), mf_sha256=mf_sha)
    timer = loop.Timer()
    cat = CatAutoEncoder(len(data.domains), cfg.dim, torch.Generator().manual_seed(seed * 7919 + 17)).to(device)
    names = [n for n, _ in cat.named_parameters()]
    opt = torch.optim.Adam(cat.parameters(), lr=cfg.cat_lr)
    gen = loop.generator(device, seed, 350)
    sched = loop.Schedule(cfg.cat_epochs, cfg.cat_patience, 1)
    params = lambda: {k: v.detach() for k, v in cat.state_dict().items()}  # noqa: E731
    if resume and world.rank0s(out.state.is_file(), device):
        t = _restore(out, sched, gen, {"mf_sha256": mf_sha}, params())
        load_torch_optimizer_tensors(opt, names, t)
    weights = (cfg.cl_weight, cfg.rec_weight, cfg.rec_weight)
    n_dom = len(data.domains)

    def step(idx: torch.Tensor) -> torch.Tensor:
        x = cat.inputs(blocks[idx], has[idx])
        which = torch.randint(n_dom, (len(idx),), generator=gen, device=device)  # the whole global batch's
        if world.size == 1:
            return _descend(opt, cat.loss(x, which, cfg.temperature, weights)[0])
        part = world.part(len(idx))  # every rank encodes the whole batch (the negatives), takes its anchors
        loss = cat.loss(x, which, cfg.temperature, weights, part)[0] if part[1] > part[0] else x.new_zeros(())
        return _descend_part(opt, loss, list(cat.parameters()), world)

    _fit(
        out,
        sched,
        gen,
        data.n_users,
        cfg.cat_batch_size,
        step,
        params,
        lambda: torch_optimizer_tensors(opt, names),
        lambda loss: {"training loss (negated)": -loss},  # no ranking to validate: the lowest loss is the best
        CAT,
        progress,
        by_loss=True,
        world=world,
    )
    return sched.result(CAT, seed, out.best, timer, {}, {"domain": "cat"})


def run_art(
    cfg: CatArtConfig,
    data: Dataset,
    run_dir: Path,
    seed: int,
    domain: str,
    *,
    resume=False,
    progress=None,
    world: distributed.World = distributed.SINGLE,
) -> loop.SeedResult:
    """Stage 3: ART for target ``domain``, from the stage-1 tables and the frozen CAT."""
    check_names(data)
    device = distributed.device_for(loop.resolve_device(cfg.device))
    d = data.domain_index(domain)
    domain, lo, hi = data.domains[d], data.item_offsets[d], data.item_offsets[d + 1]
    sdir = layout.seed_dir(run_dir, seed)
    users, items, mf_sha = stage1_tables(cfg, data, sdir, device)
    cat_path = loop.require(sdir / layout.CAT_ART_CAT, "baseline cat-art CAT")
    cat = load_cat(cat_path, data, mf_sha, cfg.dim, device)
    cat_sha = sha256_file(cat_path)
    has = has_train_rows(data, device)
    conf = stage_configs(cfg)[ART]
    out = loop.Outputs.of(ART, data, run_dir, seed, layout.baseline_name("cat-art", domain), conf)
    out.meta = dict(
        domain=domain, dim=cfg.dim, n_users=data.n_users, item_offset=lo, n_items=hi - lo, cat_sha256=cat_sha
    )
    timer, label = loop.Timer(), f"{ART} {domain}"
    model = build_baseline("cat-art", conf, data, d, device, torch.Generator().manual_seed(seed * 7919 + 401 * d))
    with torch.no_grad():
        model.users.copy_(users)
        model.items.copy_(items[d])
        model.pad.copy_(cat.pad)
        model.has.copy_(has)
        x = cat.inputs(users.transpose(0, 1), has.T)
        model.z.copy_(cat.encoder(x))  # the global part's input: the frozen encoder of the full x
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # the parameters a step gives gradients (one domain: no attention), the ones summed over the ranks
    used = [p for n, p in model.named_parameters() if model.sources or not n.startswith("attention.")]
    gen = loop.generator(device, seed, 400 + d)
    sched = loop.Schedule(cfg.epochs, cfg.patience, cfg.eval_every)
    if resume and world.rank0s(out.state.is_file(), device):
        t = _restore(out, sched, gen, {"domain": domain, "cat_sha256": cat_sha}, model.tensors())
        load_torch_optimizer_tensors(opt, names, t)
    sel = data.train_domain == d
    tu, ti = data.train_user[sel].to(device), data.train_item[sel].to(device)
    sampler = NegativeSampler(data, device)

    def step(idx: torch.Tensor) -> torch.Tensor:
        u = tu[idx]
        j = sampler(u, torch.full_like(u, d), gen)
        if world.size == 1:
            return _descend(opt, model.objective(u, ti[idx] - lo, j - lo, cfg.reg, gen))
        part = world.part(len(u))  # the dropout of the whole batch drawn, this rank's rows' loss
        return _descend_part(opt, model.objective(u, ti[idx] - lo, j - lo, cfg.reg, gen, part), used, world)

    _fit(
        out,
        sched,
        gen,
        len(tu),
        cfg.batch_size,
        step,
        model.tensors,
        lambda: torch_optimizer_tensors(opt, names),
        lambda _loss: {domain: baseline_valid_score(model, data, domain)},
        label,
        progress,
        world=world,
    )
    return sched.result(label, seed, out.best, timer, {domain: sched.best}, {"domain": domain})


def run_seed(
    cfg: CatArtConfig,
    data: Dataset,
    run_dir: Path,
    seed: int,
    domains: list[str],
    *,
    resume=False,
    progress=None,
    world: distributed.World = distributed.SINGLE,
) -> list[loop.SeedResult]:
    """The three stages for one seed: BPR-MF on every domain, CAT, then ART on each of ``domains``.
    Data-parallel, the ranks wait after stages 1 and 2 until rank 0 has written what the next one reads."""
    kw = dict(resume=resume, progress=progress, world=world)
    barrier = torch.zeros(1, device=distributed.device_for(loop.resolve_device(cfg.device)))
    mf = [run_mf(cfg, data, run_dir, seed, d, **kw) for d in data.domains]
    world.sum_(barrier)  # rank 0 has written the stage-1 checkpoints (one process: a no-op)
    cat = run_cat(cfg, data, run_dir, seed, **kw)
    world.sum_(barrier)  # and CAT's
    art = [run_art(cfg, data, run_dir, seed, d, **kw) for d in domains]
    return [*mf, cat, *art]
