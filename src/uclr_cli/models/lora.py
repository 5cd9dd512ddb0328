"""Domain-aware LoRA on the user table (paper §3.5): W = W0 + (alpha/r)·B·A."""

from __future__ import annotations

import torch
from torch import nn


class LoRAEmbedding(nn.Module):
    """A frozen table W0 plus a low-rank update; B starts at zero so W == W0 at first.

    B is per user (|U| x r), A is shared (r x m). Only A and B train; W0 is a
    buffer, so no optimizer can touch it.
    """

    def __init__(self, base: torch.Tensor, rank: int, alpha: float, gen: torch.Generator | None = None):
        super().__init__()
        n, m = base.shape
        self.register_buffer("base", base.detach().clone())
        self.rank = rank
        self.scale = alpha / rank
        self.lora_b = nn.Parameter(torch.zeros(n, rank, dtype=base.dtype))
        a = torch.randn(rank, m, generator=gen, dtype=base.dtype) / rank**0.5
        self.lora_a = nn.Parameter(a)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.base[idx] + self.scale * (self.lora_b[idx] @ self.lora_a)

    def weight(self) -> torch.Tensor:
        return self.base + self.scale * (self.lora_b @ self.lora_a)

    def merged(self) -> torch.Tensor:
        """W0 + scale·B·A as a plain tensor (what serving would use)."""
        with torch.no_grad():
            return self.weight().clone()
