"""What GA-MTCDR costs on a prepared dataset (CPU): skip-gram rounds and joint-model steps, extrapolated to epochs.

    python benchmarks/ga_mtcdr_cost.py data/douban [--rounds 2] [--steps 20] [--dim 128]

Stage 1 is timed on `--rounds` walk rounds (one walk from every node with edges each) of every domain at the
defaults' walk length and window; an epoch at the defaults is `walks_per_node` rounds. Stage 2 is timed on
`--steps` steps per target (the stage's own objective and Adam); an epoch is ceil(train rows / positives per
step) steps per target. Only the training work is timed.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from uclr_cli import loop
from uclr_cli.config import GaMtcdrConfig
from uclr_cli.data.dataset import load_prepared
from uclr_cli.models.ga_mtcdr import SkipGram, random_walks, window_pairs
from uclr_cli.sampling import NegativeSampler
from uclr_cli.stages import ga_mtcdr as ga
from uclr_cli.trained import build_baseline


def measure(data, rounds: int = 2, steps: int = 20, dim: int = 128, domains=None, say=print) -> dict[str, float]:
    """Seconds per skip-gram epoch (per domain, at the default walks per node) and per joint epoch (all targets)."""
    cfg = GaMtcdrConfig(dim=dim, device="cpu")
    gen = loop.generator(torch.device("cpu"), 0, 0)
    found: dict[str, float] = {}
    for d, dom in enumerate(data.domains):
        if domains is not None and dom not in domains:
            continue
        g = ga.domain_graph(data, d, "cpu")
        sg = SkipGram(g.n_nodes, cfg.dim, g.degree)
        starts_all = g.nodes_with_edges()
        t0, pairs = time.perf_counter(), 0
        for _ in range(rounds):
            starts = starts_all[torch.randperm(len(starts_all), generator=gen)]
            for s in range(0, len(starts), ga.WALK_CHUNK):
                walks = random_walks(g, starts[s : s + ga.WALK_CHUNK], cfg.walk_length, gen)
                c, o = window_pairs(walks, cfg.window, gen)
                perm = torch.randperm(len(c), generator=gen)
                c, o = c[perm], o[perm]
                for b in range(0, len(c), cfg.sg_batch_size):
                    cc, oo = c[b : b + cfg.sg_batch_size], o[b : b + cfg.sg_batch_size]
                    sg.step(cc, oo, sg.negatives((len(cc), cfg.sg_negatives), gen), 0.025)
                pairs += len(c)
        sec = (time.perf_counter() - t0) / rounds
        epoch = sec * cfg.walks_per_node
        found[f"skip-gram {dom}"] = epoch
        say(
            f"skip-gram {dom}: {g.n_nodes:,} nodes ({len(starts_all):,} with edges), {pairs / rounds:,.0f} pairs "
            f"per round, {pairs / rounds / sec:,.0f} pairs/s, {sec:.2f} s per round -> {epoch:,.0f} s "
            f"({epoch / 3600:.2f} h) per epoch at {cfg.walks_per_node} walks per node"
        )
    # stage 2: the joint model's steps
    models = [build_baseline("ga-mtcdr", {"dim": cfg.dim}, data, d, "cpu") for d in range(len(data.domains))]
    for m in models:
        m.share(models[0])
    with torch.no_grad():
        models[0].user_nodes.normal_(generator=gen)
        models[0].has.copy_(data.train_counts > 0)
        for m in models:
            m.item_nodes.normal_(generator=gen)
    joint = torch.nn.ModuleList(models)
    opt = torch.optim.Adam([p for _, p in joint.named_parameters()], lr=cfg.lr)
    sampler = NegativeSampler(data, torch.device("cpu"))
    per_step = cfg.batch_size // (1 + cfg.n_negatives)
    labels = torch.zeros(per_step, 1 + cfg.n_negatives)
    labels[:, 0] = 1
    total = 0.0
    for d, (m, dom) in enumerate(zip(models, data.domains)):
        sel = data.train_domain == d
        tu, ti = data.train_user[sel], data.train_item[sel] - data.item_offsets[d]
        t0 = time.perf_counter()
        for _ in range(steps):
            b = torch.randint(len(tu), (per_step,), generator=gen)
            u = tu[b]
            uu = u.repeat_interleave(cfg.n_negatives)
            j = sampler(uu, torch.full_like(uu, d), gen) - data.item_offsets[d]
            items = torch.cat([ti[b].unsqueeze(1), j.reshape(-1, cfg.n_negatives)], 1)
            loss = m.objective(u, items, labels, cfg.reg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sec = (time.perf_counter() - t0) / steps
        n_steps = math.ceil(len(tu) / per_step)
        total += sec * n_steps
        say(f"joint {dom}: {len(tu):,} train rows, {n_steps:,} steps per epoch, {sec:.3f} s per step")
    found["joint"] = total
    say(f"joint: {total:,.0f} s ({total / 60:.1f} min) per epoch over all targets (training only)")
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dim", type=int, default=128)
    a = ap.parse_args()
    data = load_prepared(a.data)
    print(f"{a.data}: {data.n_users:,} users, domains {data.domains}, threads {torch.get_num_threads()}")
    measure(data, a.rounds, a.steps, a.dim)


if __name__ == "__main__":
    main()
