"""Negative sampling for BPR-style losses, as tensor operations on the device."""

from __future__ import annotations

import torch

from uclr_cli.data.dataset import Dataset


class NegativeSampler:
    """Same-domain negatives drawn on the device; collisions with train items redrawn.

    The negative for a positive of domain d is a uniform item of d's contiguous
    item range. Collisions with the user's train items are redrawn a fixed
    number of rounds (no host sync, the same RNG use every step).
    """

    def __init__(self, data: Dataset, device: torch.device, rounds: int = 3):
        self.n_items = data.n_items
        self.offsets = torch.tensor(data.item_offsets, dtype=torch.int64, device=device)
        keys = data.train_user.to(device) * data.n_items + data.train_item.to(device)
        self.keys = torch.sort(keys).values
        self.rounds = rounds

    def __call__(self, users: torch.Tensor, domains: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        lo = self.offsets[domains]
        size = self.offsets[domains + 1] - lo
        neg = self.draw(lo, size, gen)
        for _ in range(self.rounds):
            key = users * self.n_items + neg
            pos = torch.searchsorted(self.keys, key).clamp_(max=len(self.keys) - 1)
            hit = self.keys[pos] == key
            neg = torch.where(hit, self.draw(lo, size, gen), neg)
        return neg

    @staticmethod
    def draw(lo: torch.Tensor, size: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        r = torch.rand(lo.shape, generator=gen, device=lo.device, dtype=torch.float64)
        return lo + torch.minimum((r * size).long(), size - 1)
