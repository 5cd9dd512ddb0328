"""Negative sampling for BPR-style losses, as tensor operations on the device."""

from __future__ import annotations

import torch

from uclr_cli.data.dataset import Dataset


class NegativeSampler:
    """Same-domain negatives drawn on the device; collisions with train items redrawn.

    The negative for a positive of domain d is an item of d's contiguous item
    range: ``uniform`` over it (the paper's), ``popularity``: the item of a
    uniform train interaction of d (so in proportion to train counts; the
    sampler of implicit's BPR), or ``mix``: popularity with probability
    ``pop_share``, else uniform. A domain without train rows falls back to
    uniform. Collisions with the user's train items are redrawn a fixed
    number of rounds (no host sync, the same RNG use every step).
    """

    def __init__(
        self, data: Dataset, device: torch.device, kind: str = "uniform", pop_share: float = 0.5, rounds: int = 3
    ):
        if kind not in ("uniform", "popularity", "mix"):
            raise ValueError(f"unknown negative sampler {kind!r}")
        if len(data.train_item) == 0:
            kind = "uniform"  # nothing to draw in proportion to
        self.n_items, self.kind, self.rounds = data.n_items, kind, rounds
        self.share = 1.0 if kind == "popularity" else pop_share
        self.offsets = torch.tensor(data.item_offsets, dtype=torch.int64, device=device)
        keys = data.train_user.to(device) * data.n_items + data.train_item.to(device)
        self.keys = torch.sort(keys).values
        if kind != "uniform":  # train items sorted: domain d's interactions are one contiguous run
            self.pop_items = torch.sort(data.train_item.to(device)).values
            self.pop_offsets = torch.searchsorted(self.pop_items, self.offsets)

    def __call__(self, users: torch.Tensor, domains: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        lo = self.offsets[domains]
        size = self.offsets[domains + 1] - lo
        neg = self.draw(lo, size, domains, gen)
        for _ in range(self.rounds):
            key = users * self.n_items + neg
            pos = torch.searchsorted(self.keys, key).clamp_(max=len(self.keys) - 1)
            hit = self.keys[pos] == key
            neg = torch.where(hit, self.draw(lo, size, domains, gen), neg)
        return neg

    def draw(self, lo: torch.Tensor, size: torch.Tensor, domains: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        r = torch.rand(lo.shape, generator=gen, device=lo.device, dtype=torch.float64)
        uniform = lo + torch.minimum((r * size).long(), size - 1)
        if self.kind == "uniform":
            return uniform
        start = self.pop_offsets[domains]
        count = self.pop_offsets[domains + 1] - start
        r2 = torch.rand(lo.shape, generator=gen, device=lo.device, dtype=torch.float64)
        idx = (start + torch.minimum((r2 * count).long(), (count - 1).clamp(min=0))).clamp_(max=len(self.pop_items) - 1)
        use_pop = count > 0
        if self.kind == "mix":
            use_pop &= torch.rand(lo.shape, generator=gen, device=lo.device, dtype=torch.float64) < self.share
        return torch.where(use_pop, self.pop_items[idx], uniform)
