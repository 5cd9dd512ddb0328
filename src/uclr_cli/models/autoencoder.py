"""The collaborative autoencoder shared by both streams (paper §3.4)."""

from __future__ import annotations

import torch
from torch import nn

from uclr_cli.models import load_weights


class AutoEncoder(nn.Module):
    """Encoder dim -> hidden[0] -> ... -> hidden[-1]; decoder mirrors it back to dim.

    One set of weights serves both streams (the original and the masked
    embeddings). ReLU between layers; the code and the output are linear.
    """

    def __init__(self, dim: int, hidden: list[int]):
        super().__init__()
        sizes = [dim, *hidden]
        self.encoder = _mlp(sizes)
        self.decoder = _mlp(sizes[::-1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def mask_rows(x: torch.Tensor, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Zero a random ``ratio`` share of the rows (the paper's wording)."""
    n = x.shape[0]
    k = int(round(ratio * n))
    if k == 0:
        return x
    idx = torch.randperm(n, generator=gen, device=gen.device)[:k].to(x.device)
    keep = torch.ones(n, 1, dtype=x.dtype, device=x.device)
    keep[idx] = 0
    return x * keep


def mask_elements(x: torch.Tensor, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Zero each entry independently with probability ``ratio``."""
    keep = torch.rand(x.shape, generator=gen, device=gen.device).to(x.device) >= ratio
    return x * keep.to(x.dtype)


def ae_tensors(ae: AutoEncoder) -> dict[str, torch.Tensor]:
    """The autoencoder's weights under ``ae.*`` names (one checkpoint holds several parts)."""
    return {f"ae.{k}": v for k, v in ae.state_dict().items()}


def load_ae(ae: AutoEncoder, t: dict[str, torch.Tensor]) -> None:
    """Load the ``ae.*`` tensors of a checkpoint into ``ae``; a missing, extra or misshapen one: ValueError."""
    load_weights(ae, {k[3:]: v for k, v in t.items() if k.startswith("ae.")})


def learned_columns(users: torch.Tensor, fixed_last: bool) -> torch.Tensor:
    """The columns of a PGE user table that are learned: with an item bias the last one is a constant 1
    (the bias's partner), which the autoencoder and the adapter leave alone."""
    return users[:, :-1] if fixed_last else users


def with_fixed_column(rep: torch.Tensor, fixed_last: bool) -> torch.Tensor:
    """``rep`` with the constant 1 column put back (so scores against biased item tables stay exact)."""
    return torch.cat([rep, rep.new_ones(rep.shape[0], 1)], 1) if fixed_last else rep
