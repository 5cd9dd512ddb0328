"""The ranks of tests/test_distributed.py, spawned by torch.multiprocessing: this module imports only what
they need (torch and a few library modules), so a rank starts in about the time torch takes to import."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from uclr_cli import distributed
from uclr_cli.config import ContrastLossConfig
from uclr_cli.contrastive import TemperatureState, combined_loss
from uclr_cli.losses import bpr_objective
from uclr_cli.models.autoencoder import AutoEncoder
from uclr_cli.models.lora import LoRAEmbedding
from uclr_cli.optim import BPRRowStep

N_USERS, N_ITEMS, DIM = 13, 11, 4
N, BATCH = 17, 8  # batches of 8, 8, 1: the last one leaves rank 1 of 2 without rows


def _train(world: distributed.World, kind: str) -> torch.Tensor:
    """Three epochs of BPR with SGD in float64, the way pretrain splits a batch over the ranks."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(N_USERS + N_ITEMS, DIM, generator=g, dtype=torch.float64) * 0.3
    tu, ti = torch.randint(N_USERS, (N,), generator=g), torch.randint(N_ITEMS, (N,), generator=g)
    gen = torch.Generator().manual_seed(1)  # the same draws on every rank
    reg = (0.01, 0.02, 0.03)
    if kind == "dense":
        users, items = emb[:N_USERS].clone().requires_grad_(), emb[N_USERS:].clone().requires_grad_()
        params = [users, items]  # plain SGD by hand: torch.optim's first step imports for seconds
    else:
        opt = BPRRowStep(emb, N_USERS, 0.5, reg, kind=kind, fixed_last_user_col=True)
    for _ in range(3):
        perm = torch.randperm(N, generator=gen)
        for s in range(0, N, BATCH):
            idx = perm[s : s + BATCH]
            u, i = tu[idx], ti[idx]
            j = torch.randint(N_ITEMS, (len(idx),), generator=gen)
            lo, hi = world.part(len(u))
            if kind != "dense":
                if world.size == 1:
                    opt.step(u, i, j)
                else:
                    opt.step(u, i, j, part=(lo, hi), reduce=world.sum_)
                continue
            for p in params:
                p.grad = None
            if hi > lo:
                loss = bpr_objective(users[u[lo:hi]], items[i[lo:hi]], items[j[lo:hi]], reg)
                (loss * ((hi - lo) / len(u)) if world.size > 1 else loss).backward()
            world.sum_grads(params)
            with torch.no_grad():
                for p in params:
                    p.sub_(p.grad, alpha=0.5)
    return emb if kind != "dense" else torch.cat([users, items]).detach()


KINDS = ("sgd", "rmsprop", "dense")


def _worker(rank: int, size: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=60)
    )
    world = distributed.World(rank, size)
    save_file({k: _train(world, k) for k in KINDS}, f"{out}/rank{rank}.safetensors")
    if rank == 0:  # rank 1 has left: the next collective fails in one line, well before the timeout
        t0 = time.perf_counter()
        try:
            world.sum_(torch.zeros(3))
            message = "no error"
        except distributed.TrainingError as e:
            message = e.one_line()
        Path(out, "lost.txt").write_text(f"{time.perf_counter() - t0:.1f}\n{message}")
    else:
        torch.distributed.destroy_process_group()


# --- contrast and finetune (stages/contrast.py, stages/finetune.py): SGD in float64 -------------------------------

N_CON = 16  # contrast: users in batches of 5, 5, 5, 1 (the last one is skipped: no negative)
TEMPERATURES = ("individual", "global", "none")
CONTRAST_USERS = 5  # finetune's contrast batch: 3 and 2 anchors
LR = 0.1  # larger steps amplify the float reordering (0.5: 5e-13 after 3 epochs, 1e-15 after 1)


def _sgd(params: list[torch.Tensor]) -> None:
    """Plain SGD by hand: torch.optim's first step imports for seconds."""
    with torch.no_grad():
        for p in params:
            p.sub_(p.grad, alpha=LR)


def _loss_cfg(temperature: str) -> ContrastLossConfig:
    return ContrastLossConfig(temperature=temperature, tau_lr=0.05, tau_init=0.5, alpha=0.1, mask="element")


def train_contrast(world: distributed.World, temperature: str, epochs: int = 3) -> dict[str, torch.Tensor]:
    """``epochs`` of the contrast stage's loop over ``N_CON`` users: the autoencoder's weights and τ, u."""
    torch.set_default_dtype(torch.float64)  # τ and u too, and the masks
    try:
        cfg = _loss_cfg(temperature)
        x = torch.randn(N_CON, DIM, generator=torch.Generator().manual_seed(2))
        torch.manual_seed(0)
        ae = AutoEncoder(DIM, [5, 3])
        params = list(ae.parameters())
        temps = TemperatureState(N_CON, cfg, torch.device("cpu"))
        gen = torch.Generator().manual_seed(1)
        for epoch in range(1, epochs + 1):
            perm = torch.randperm(N_CON, generator=gen)
            for s in range(0, N_CON, 5):
                b = perm[s : s + 5]
                if len(b) < 2:
                    continue
                part = world.part(len(b)) if world.size > 1 else None
                for p in params:
                    p.grad = None
                objective, _, step = combined_loss(ae, x[b], b, temps, cfg, gen, epoch == 1, part)
                if objective.requires_grad:
                    objective.backward()
                world.sum_grads(params)
                _sgd(params)
                if step is not None:
                    temps.update(b, step.log_u, step.grad_tau)
        out = {f"ae.{k}": v.detach().clone() for k, v in ae.state_dict().items()}
        return {**out, **{k: v.clone() for k, v in temps.tensors().items()}}
    finally:
        torch.set_default_dtype(torch.float32)


def train_finetune(world: distributed.World, epochs: int = 3) -> dict[str, torch.Tensor]:
    """``epochs`` of the finetune stage's loop: BPR on LoRA users through a trained autoencoder, items
    trained, plus the contrastive term on ``CONTRAST_USERS`` users; batches of 8, 8, 1 (rank 1 of 2 gets no
    BPR row in the last one, but its share of the contrast batch)."""
    torch.set_default_dtype(torch.float64)
    try:
        cfg = _loss_cfg("individual")
        g = torch.Generator().manual_seed(0)
        base = torch.randn(N_USERS, DIM, generator=g) * 0.5
        item_emb = torch.nn.Parameter(torch.randn(N_ITEMS, DIM, generator=g) * 0.5)
        tu, ti = torch.randint(N_USERS, (N,), generator=g), torch.randint(N_ITEMS, (N,), generator=g)
        torch.manual_seed(0)
        ae = AutoEncoder(DIM, [5, 3])
        lora = LoRAEmbedding(base, 2, 2.0, gen=torch.Generator().manual_seed(4))
        params = [lora.lora_a, lora.lora_b, item_emb, *ae.parameters()]
        temps = TemperatureState(N_USERS, cfg, torch.device("cpu"))
        gen = torch.Generator().manual_seed(1)
        for _ in range(epochs):
            perm = torch.randperm(N, generator=gen)
            for s in range(0, N, BATCH):
                idx = perm[s : s + BATCH]
                u, i = tu[idx], ti[idx]
                j = torch.randint(N_ITEMS, (len(idx),), generator=gen)
                lo, hi = world.part(len(u))
                loss = torch.zeros(())
                if hi > lo:
                    ul, il, jl = u[lo:hi], i[lo:hi], j[lo:hi]
                    loss = bpr_objective(ae(lora.rows(ul)), item_emb[il], item_emb[jl], 0.01)
                    if hi - lo < len(u):
                        loss = loss * ((hi - lo) / len(u))
                b = torch.randperm(N_USERS, generator=gen)[:CONTRAST_USERS]
                part = world.part(len(b)) if world.size > 1 else None
                obj, _, step = combined_loss(ae, lora.rows(b), b, temps, cfg, gen, False, part)
                loss = loss + 0.5 * obj
                for p in params:
                    p.grad = None
                if loss.requires_grad:
                    loss.backward()
                world.sum_grads(params)
                _sgd(params)
                temps.update(b, step.log_u, step.grad_tau)
        out = {"lora_a": lora.lora_a, "lora_b": lora.lora_b, "items": item_emb}
        out.update({f"ae.{k}": v for k, v in ae.state_dict().items()})
        return {**{k: v.detach().clone() for k, v in out.items()}, **{k: v.clone() for k, v in temps.tensors().items()}}
    finally:
        torch.set_default_dtype(torch.float32)


def train_stages(world: distributed.World, epochs: int = 3) -> dict[str, torch.Tensor]:
    """Every variant of :func:`train_contrast` and :func:`train_finetune`, as ``<variant>/<tensor>``."""
    out = {f"finetune/{k}": v for k, v in train_finetune(world, epochs).items()}
    for temperature in TEMPERATURES:
        out.update({f"contrast-{temperature}/{k}": v for k, v in train_contrast(world, temperature, epochs).items()})
    return out


def _stages_worker(rank: int, size: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=60)
    )
    save_file(train_stages(distributed.World(rank, size)), f"{out}/stages{rank}.safetensors")
    torch.distributed.destroy_process_group()


# --- the single-domain baselines (stages/baseline.py): their own optimizers (Adam), float64 --------------------

OFFSET = 3  # the domain's first global item id


def train_baseline(world: distributed.World, kind: str, epochs: int = 3) -> dict[str, torch.Tensor]:
    """``epochs`` of the baseline stage's NeuMF or LightGCN step with its optimizers (row-wise Adam on NeuMF's
    tables with sparse gradients, Adam on the rest) over batches of 8, 8, 1, two negatives per positive."""
    from uclr_cli.config import BaselineConfig
    from uclr_cli.models.baselines import LightGCN, NeuMF, normalized_graph
    from uclr_cli.stages.baseline import _Optimizers, neumf_step

    torch.set_default_dtype(torch.float64)
    try:
        g = torch.Generator().manual_seed(0)
        tu, ti = torch.randint(N_USERS, (N,), generator=g), torch.randint(N_ITEMS, (N,), generator=g) + OFFSET
        init = torch.Generator().manual_seed(3)
        if kind == "neumf":
            model = NeuMF(N_USERS, N_ITEMS, OFFSET, DIM, [6, 3], gen=init, init_std=0.5)
        else:
            graph = normalized_graph(tu, ti - OFFSET, N_USERS, N_ITEMS).to(torch.float64)
            model = LightGCN(N_USERS, N_ITEMS, OFFSET, DIM, 2, graph, gen=init, init_std=0.5)
        opt = _Optimizers(kind, model, BaselineConfig(model=kind, lr=0.01))
        gen = torch.Generator().manual_seed(1)
        for _ in range(epochs):
            perm = torch.randperm(N, generator=gen)
            for s in range(0, N, BATCH):
                idx = perm[s : s + BATCH]
                u, i = tu[idx], ti[idx]
                if kind == "neumf":
                    j = torch.randint(N_ITEMS, (2 * len(idx),), generator=gen) + OFFSET
                    neumf_step(model, opt, u, i, j, 0.01, world)
                    continue
                u, i = u.repeat_interleave(2), i.repeat_interleave(2)  # as the stage: one BPR pair per negative
                j = torch.randint(N_ITEMS, (len(u),), generator=gen) + OFFSET
                p0, p1 = world.part(len(u))
                if p1 > p0:
                    loss = model.objective(u[p0:p1], i[p0:p1] - OFFSET, j[p0:p1] - OFFSET, 0.01)
                    (loss * ((p1 - p0) / len(u)) if world.size > 1 else loss).backward()
                opt.step(world)
        return {k: v.detach().clone() for k, v in {**model.tensors(), **opt.state_tensors()}.items()}
    finally:
        torch.set_default_dtype(torch.float32)


def _baselines_worker(rank: int, size: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=60)
    )
    world = distributed.World(rank, size)
    tensors = {f"{kind}/{k}": v for kind in ("neumf", "lightgcn") for k, v in train_baseline(world, kind).items()}
    save_file(tensors, f"{out}/baselines{rank}.safetensors")
    torch.distributed.destroy_process_group()


# --- CAT-ART (stages/cat_art.py): its three parts, float64 ---------------------------------------------------

N_DOM, N_CAT, CAT_BATCH = 3, 11, 5  # CAT: users in batches of 5, 5, 1 (shares 3 and 2, then 1 and none)


def train_cat_art(world: distributed.World, epochs: int = 3) -> dict[str, torch.Tensor]:
    """``epochs`` of each CAT-ART stage's loop with the library's pieces: stage 1's row-wise Adam BPR step
    (its optimizer), CAT's loss (in-batch InfoNCE both ways, the MSE terms) and ART's objective (dropout on the
    attention drawn from the generator), these two with SGD; BPR batches of 8, 8, 1 (an empty share)."""
    from uclr_cli.models.cat_art import ART, CatAutoEncoder

    torch.set_default_dtype(torch.float64)
    try:
        g = torch.Generator().manual_seed(0)
        emb = torch.randn(N_USERS + N_ITEMS, DIM, generator=g) * 0.3
        tu, ti = torch.randint(N_USERS, (N,), generator=g), torch.randint(N_ITEMS, (N,), generator=g)
        blocks, has = torch.randn(N_CAT, N_DOM, DIM, generator=g), torch.rand(N_CAT, N_DOM, generator=g) > 0.3
        mf = BPRRowStep(emb, N_USERS, 0.05, 0.01, kind="adam")
        cat = CatAutoEncoder(N_DOM, DIM, torch.Generator().manual_seed(3))
        art = ART(N_USERS, N_ITEMS, 0, DIM, N_DOM, 1, dropout=0.3, gen=torch.Generator().manual_seed(4))
        with torch.no_grad():
            art.users.normal_(0, 0.5, generator=g)
            art.items.normal_(0, 0.5, generator=g)
            art.z.normal_(0, 0.5, generator=g)
            art.has.copy_(torch.rand(N_DOM, N_USERS, generator=g) > 0.2)
        gen = torch.Generator().manual_seed(1)  # the same draws on every rank
        for _ in range(epochs):
            perm = torch.randperm(N, generator=gen)  # stage 1
            for s in range(0, N, BATCH):
                idx = perm[s : s + BATCH]
                j = torch.randint(N_ITEMS, (len(idx),), generator=gen)
                if world.size == 1:
                    mf.step(tu[idx], ti[idx], j)
                else:
                    mf.step(tu[idx], ti[idx], j, part=world.part(len(idx)), reduce=world.sum_)
            perm = torch.randperm(N_CAT, generator=gen)  # CAT
            for s in range(0, N_CAT, CAT_BATCH):
                b = perm[s : s + CAT_BATCH]
                x = cat.inputs(blocks[b], has[b])
                which = torch.randint(N_DOM, (len(b),), generator=gen)
                part = world.part(len(b)) if world.size > 1 else None
                for p in cat.parameters():
                    p.grad = None
                if part is None or part[1] > part[0]:
                    cat.loss(x, which, 0.5, (0.2, 0.4, 0.4), part)[0].backward()
                world.sum_grads(list(cat.parameters()))
                _sgd(list(cat.parameters()))
            perm = torch.randperm(N, generator=gen)  # ART
            for s in range(0, N, BATCH):
                idx = perm[s : s + BATCH]
                j = torch.randint(N_ITEMS, (len(idx),), generator=gen)
                part = world.part(len(idx)) if world.size > 1 else None
                for p in art.parameters():
                    p.grad = None
                loss = art.objective(tu[idx], ti[idx], j, 0.01, gen, part)
                if loss.requires_grad:
                    loss.backward()
                world.sum_grads(list(art.parameters()))
                _sgd(list(art.parameters()))
        out = {"mf/emb": emb, "mf/m": mf.state_tensors()["opt.m"], "mf/v": mf.state_tensors()["opt.v"]}
        out.update({f"cat/{k}": v for k, v in cat.state_dict().items()})
        out.update({f"art/{k}": v for k, v in art.state_dict().items() if v.is_floating_point()})
        return {k: v.detach().clone() for k, v in out.items()}
    finally:
        torch.set_default_dtype(torch.float32)


def _cat_art_worker(rank: int, size: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=60)
    )
    save_file(train_cat_art(distributed.World(rank, size)), f"{out}/cat_art{rank}.safetensors")
    torch.distributed.destroy_process_group()


# --- DCP states (uclr_cli.dcp): saved by 2 ranks, read back by 3 ------------------------------------------------

DCP_META = {
    "stage": "pretrain-resume",
    "dataset": "fp",
    "seed": 0,
    "config": {"dim": DIM},
    "epoch": 3,
    "best_score": 0.5,
    "best_epoch": 2,
    "bad": 0,
    "per_domain": {"a": 0.5},
    "done": False,
}
DCP_BEST_META = {"stage": "pretrain", "dataset": "fp", "seed": 0, "config": {"dim": DIM}, "epoch": 2, "best_score": 0.5}


def dcp_tensors() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A resume state and a best checkpoint shaped like pretrain's: tables of 13 and 11 rows (uneven over 2
    and 3 ranks), float64, float32 and int64 tensors, a step counter and a generator state."""
    g = torch.Generator().manual_seed(5)
    state = {
        "user_emb": torch.randn(N_USERS, DIM, generator=g, dtype=torch.float64),
        "item_emb": torch.randn(N_ITEMS, DIM, generator=g, dtype=torch.float64),
        "opt.v": torch.rand(N_USERS + N_ITEMS, DIM, generator=g),
        "opt.last": torch.randint(100, (N_USERS + N_ITEMS,), generator=g),
        "opt.step": torch.tensor([7]),
        "rng": torch.Generator().manual_seed(3).get_state(),
    }
    best = {"user_emb": torch.randn(N_USERS, DIM, generator=g), "item_emb": torch.randn(N_ITEMS, DIM, generator=g)}
    return state, best


def _dcp_worker(rank: int, size: int, init: str, folder: str) -> None:
    """Ranks 0 and 1 save a DCP state (in a group of their own), then all 3 load it, each writing what it read."""
    from uclr_cli import dcp

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=60)
    )
    pair = torch.distributed.new_group([0, 1])  # every rank takes part in making a group
    if rank < 2:
        state, best = dcp_tensors()
        dcp.save(Path(folder), distributed.World(rank, 2, pair), state, DCP_META, best, DCP_BEST_META)
    torch.distributed.barrier()
    state, meta, best, best_meta = dcp.load(
        Path(folder), distributed.World(rank, size), stage="pretrain-resume", fingerprint="fp"
    )
    out = {**state, **{f"best.{k}": v for k, v in best.items()}}
    save_file(out, f"{Path(folder).parent.parent}/load{rank}.safetensors", {"meta": repr((meta, best_meta))})
    torch.distributed.destroy_process_group()
