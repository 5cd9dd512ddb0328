"""CAT-ART (Li et al., WSDM 2023): the contrastive autoencoder (CAT) and the per-target transfer model (ART).

Pure building blocks, no I/O. Stage 1 (per-domain BPR-MF) is :class:`uclr_cli.models.baselines.BPRMF`.

* :class:`CatAutoEncoder`: input the concatenation of a user's N frozen
  stage-1 user embeddings (N·d); encoder N·d -> 5d -> 3d -> d with PReLU, the
  decoder mirrored. The augmented view replaces one domain's block (chosen
  uniformly, the target included) by a learnable pad vector, which also
  stands for the block of a domain the user has no train rows in.
* :class:`ART`: for one target domain t, trainable copies of every domain's
  user table, the target's items, a fixed global part ``z`` = Encoder(x) of
  the frozen CAT, and per user
  ``U_t[u] + Attention(U_t[u], {Linear_s(U_s[u])}_s≠t) + Linear(z[u])``
  (single-head scaled dot-product attention as in the original's BERT block:
  query, key, value and output projections, dropout on the weights in training).
  A user without train rows in a domain reads a learnable pad row there.
  The model is a dot-product scorer: its user table is computed once for scoring.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uclr_cli.losses import bpr_loss, l2_term
from uclr_cli.models.baselines import SingleDomainModel, init_linears


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if k < len(sizes) - 2:
            layers.append(nn.PReLU())
    return nn.Sequential(*layers)


def info_nce(a: Tensor, b: Tensor, temperature: float, part: tuple[int, int] | None = None) -> Tensor:
    """Symmetric in-batch InfoNCE on cosine similarity / temperature: row k of ``a`` matches row k of ``b``.

    ``part = (lo, hi)``: only the terms of anchors ``lo:hi`` (in both directions, against the whole batch
    as negatives), divided by the whole batch size: the parts of the ranks add up to the whole loss."""
    na, nb = F.normalize(a, dim=1), F.normalize(b, dim=1)
    if part is None:
        logits = na @ nb.T / temperature
        target = torch.arange(len(a), device=a.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    lo, hi = part
    target = torch.arange(lo, hi, device=a.device)
    ab = F.cross_entropy(na[lo:hi] @ nb.T / temperature, target, reduction="sum")
    ba = F.cross_entropy(nb[lo:hi] @ na.T / temperature, target, reduction="sum")
    return 0.5 * (ab + ba) / len(a)


def with_pad(blocks: Tensor, has: Tensor, pad: Tensor) -> Tensor:
    """(B, N, d) blocks with the pad in place of each block whose ``has`` (B, N) is False."""
    return torch.where(has.unsqueeze(-1), blocks, pad.expand_as(blocks))


class CatAutoEncoder(nn.Module):
    """CAT: the contrastive autoencoder over the N concatenated domain embeddings of a user."""

    def __init__(self, n_domains: int, dim: int, gen: torch.Generator | None = None):
        super().__init__()
        self.n_domains, self.dim = n_domains, dim
        with torch.random.fork_rng(devices=[]):  # the default inits draw from the global RNG; redone from gen
            self.encoder = _mlp([n_domains * dim, 5 * dim, 3 * dim, dim])
            self.decoder = _mlp([dim, 3 * dim, 5 * dim, n_domains * dim])
        init_linears(self, gen)
        self.pad = nn.Parameter(torch.zeros(dim))

    def inputs(self, blocks: Tensor, has: Tensor) -> Tensor:
        """x (B, N·d) from the (B, N, d) stage-1 rows, the pad where a user has no train rows."""
        return with_pad(blocks, has, self.pad).reshape(len(blocks), -1)

    def augment(self, x: Tensor, which: Tensor) -> Tensor:
        """x with block ``which`` (B,) of each row replaced by the pad."""
        blocks = x.reshape(len(x), self.n_domains, self.dim)
        drop = F.one_hot(which, self.n_domains).bool()
        return with_pad(blocks, ~drop, self.pad).reshape(len(x), -1)

    def loss(
        self,
        x: Tensor,
        which: Tensor,
        temperature: float,
        weights: tuple[float, float, float],
        part: tuple[int, int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """w_cl·InfoNCE(enc(x), enc(x~)) + w_rec·MSE(dec(enc(x)), x) + w_aug·MSE(dec(enc(x~)), x); (loss, parts).

        ``part = (lo, hi)`` (data-parallel): the whole batch is encoded (the InfoNCE negatives), and the
        terms of rows ``lo:hi`` are taken, each divided by the whole batch's count (a non-empty share)."""
        xa = self.augment(x, which)
        h, ha = self.encoder(x), self.encoder(xa)
        target = x.detach()
        nce = info_nce(h, ha, temperature, part)  # first: the order of autograd's sums, as before
        if part is None:
            rec, aug = F.mse_loss(self.decoder(h), target), F.mse_loss(self.decoder(ha), target)
        else:
            lo, hi = part
            rec, aug = (
                F.mse_loss(self.decoder(e[lo:hi]), target[lo:hi], reduction="sum") / target.numel() for e in (h, ha)
            )
        parts = torch.stack([nce, rec, aug])
        return (parts * torch.tensor(weights, device=x.device)).sum(), parts.detach()


class ART(SingleDomainModel):
    """ART for target domain ``target``: the target user row, attention over the sources, and the global part."""

    kind = "cat-art"

    def __init__(
        self,
        n_users: int,
        n_items: int,
        item_offset: int,
        dim: int,
        n_domains: int,
        target: int,
        dropout: float = 0.1,
        gen: torch.Generator | None = None,
    ):
        super().__init__(n_users, n_items, item_offset)
        self.dim, self.n_domains, self.target, self.dropout = dim, n_domains, target, dropout
        self.sources = [s for s in range(n_domains) if s != target]
        self.users = nn.Parameter(torch.zeros(n_domains, n_users, dim))  # every domain's users (copies of stage 1)
        self.items = nn.Parameter(torch.zeros(n_items, dim))
        self.pad = nn.Parameter(torch.zeros(dim))  # a user without train rows in a domain
        with torch.random.fork_rng(devices=[]):
            self.source_proj = nn.ModuleList(nn.Linear(dim, dim) for _ in self.sources)
            self.global_proj = nn.Linear(dim, dim)
            self.attention = nn.ModuleList(nn.Linear(dim, dim) for _ in range(4))  # query, key, value, output
        init_linears(self, gen)
        self.register_buffer("z", torch.zeros(n_users, dim))  # Encoder(x) of the frozen CAT
        self.register_buffer("has", torch.zeros(n_domains, n_users, dtype=torch.bool))  # train rows per domain

    def dropout_keep(self, n: int, gen: torch.Generator | None, device) -> Tensor | None:
        """The attention weights kept by dropout for ``n`` users (n, S), drawn from ``gen``; None when none drop."""
        if gen is None or self.dropout <= 0 or not self.sources:
            return None
        return torch.rand((n, len(self.sources)), generator=gen, device=device) >= self.dropout

    def parts(
        self, u: Tensor, gen: torch.Generator | None = None, keep: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The three parts of users ``u``'s vectors, each (B, d): the target row q = U_t[u] (the pad for a user
        without train rows there), the global part g = Linear(Enc(x_u)) and the attention over the source rows
        (None with one domain). With ``gen``, dropout on the attention weights drawn from it (training; torch's
        own dropout would read the global RNG), or the given ``keep`` mask (B, S)."""
        rows = with_pad(self.users[:, u].transpose(0, 1), self.has[:, u].T, self.pad)  # (B, N, d)
        q = rows[:, self.target]
        g = self.global_proj(self.z[u])
        if not self.sources:
            return q, g, None
        a = torch.stack([p(rows[:, s]) for p, s in zip(self.source_proj, self.sources)], 1)  # (B, S, d)
        wq, wk, wv, wo = self.attention
        w = torch.softmax((wk(a) @ wq(q).unsqueeze(2)).squeeze(2) / math.sqrt(self.dim), dim=1)
        if keep is None:
            keep = self.dropout_keep(len(u), gen, w.device)
        if keep is not None:
            w = w * keep / (1 - self.dropout)
        return q, g, wo((w.unsqueeze(2) * wv(a)).sum(1))

    def user_vectors(
        self, u: Tensor, gen: torch.Generator | None = None, keep: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(final user vectors q + g + attention (B, d), target rows q (B, d)) of users ``u`` (see :meth:`parts`)."""
        q, g, att = self.parts(u, gen, keep)
        out = q + g
        return (out if att is None else out + att), q

    def objective(
        self,
        u: Tensor,
        i: Tensor,
        j: Tensor,
        reg: float,
        gen: torch.Generator | None = None,
        part: tuple[int, int] | None = None,
    ) -> Tensor:
        """BPR on (user, local positive, local negative) + λ·L2 of the batch's final user and item vectors.

        ``part = (lo, hi)`` (data-parallel): the dropout of the whole batch is drawn from ``gen`` (so it
        advances alike on every rank), and the loss of rows ``lo:hi`` is returned, divided by the whole
        batch size (a zero without gradient for an empty share)."""
        keep = None
        if part is not None:
            keep = self.dropout_keep(len(u), gen, u.device)
            lo, hi = part
            if hi == lo:
                return self.items.new_zeros(())
            share = (hi - lo) / len(u)
            u, i, j = u[lo:hi], i[lo:hi], j[lo:hi]
            keep = None if keep is None else keep[lo:hi]
            gen = None
        eu, _ = self.user_vectors(u, gen, keep)
        ip, ineg = self.items[i], self.items[j]
        loss = bpr_loss((eu * ip).sum(1), (eu * ineg).sum(1)) + l2_term(eu, ip, ineg, reg)
        return loss if part is None or share == 1 else loss * share

    @torch.no_grad()
    def tables(self, chunk: int = 65536) -> tuple[Tensor, Tensor]:
        users = torch.arange(self.n_users, device=self.items.device)
        parts = [self.user_vectors(users[s : s + chunk])[0] for s in range(0, self.n_users, chunk)]
        table = torch.cat(parts) if parts else self.items.new_zeros(0, self.dim)
        return table, self.items.detach()
