"""Single-domain baselines of the paper's Table 2: BPRMF, NeuMF (with its GMF and MLP towers), LightGCN.

Pure building blocks, no I/O. A model owns the users (all of them: users are
shared by the domains) and one domain's items, the global index range
``[item_offset, item_offset + n_items)``. Its interface takes *global* item
ids, so the evaluator scores the very candidates it scores every other model on.

Two ways to score, both ``(users (R,), items (R, C) global) -> scores (R, C)``:

* ``tables()`` gives (user table, domain item table) whose dot products are
  the scores (BPRMF; LightGCN after propagation): the fast path;
* ``scorer()`` gives a function for models that are not a dot product
  (NeuMF); it precomputes what does not depend on the pair once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uclr_cli.losses import bpr_loss, l2_term

Scorer = Callable[[Tensor, Tensor], Tensor]


def dot_scorer(user_vecs: Tensor, item_vecs: Tensor, item_offset: int) -> Scorer:
    """Scores of (R,) users against (R, C) global item ids as dot products."""

    def score(users: Tensor, items: Tensor) -> Tensor:
        return torch.bmm(item_vecs[items - item_offset], user_vecs[users].unsqueeze(2)).squeeze(2)

    return score


def init_linears(module: nn.Module, gen: torch.Generator | None) -> None:
    """Xavier-uniform weights and zero biases of every nn.Linear in ``module``, drawn from ``gen``
    (nn.Linear's own init reads the global RNG)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, generator=gen)
            nn.init.zeros_(m.bias)


class SingleDomainModel(nn.Module):
    """What every baseline shares: users, one domain's item range, scoring and (de)serialising."""

    kind = ""

    def __init__(self, n_users: int, n_items: int, item_offset: int):
        super().__init__()
        self.n_users, self.n_items, self.item_offset = n_users, n_items, item_offset

    def tables(self) -> tuple[Tensor, Tensor] | None:
        """(users (U, m), domain items (I_d, m)) whose dot products are the scores; None if not a dot model."""
        return None

    def scorer(self) -> Scorer:
        tables = self.tables()
        if tables is None:  # pragma: no cover - subclasses without tables define scorer
            raise NotImplementedError
        return dot_scorer(*tables, self.item_offset)

    @torch.no_grad()
    def score(self, users: Tensor, items: Tensor) -> Tensor:
        """Scores (R, C) of each row's user against its C global item ids."""
        return self.scorer()(users, items)

    def tensors(self) -> dict[str, Tensor]:
        """What a checkpoint holds: the learned weights, by name."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def load_tensors(self, t: dict[str, Tensor]) -> None:
        """Load :meth:`tensors` output; a missing, extra or misshapen tensor raises ValueError."""
        own = self.tensors()
        if set(t) != set(own):
            raise ValueError(f"tensors {sorted(set(own) ^ set(t))[:4]} missing or unexpected")
        for k, v in own.items():
            if tuple(t[k].shape) != tuple(v.shape):
                raise ValueError(f"{k} has shape {tuple(t[k].shape)}, expected {tuple(v.shape)}")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(t[k])


def _normal(n: int, dim: int, std: float, gen: torch.Generator | None, init: str = "normal") -> Tensor:
    """An (n, dim) table with std ``std``: normal, or uniform(-a, a) with a = std·√3."""
    if init == "uniform":
        return (torch.rand(n, dim, generator=gen) * 2 - 1) * (std * math.sqrt(3.0))
    if init != "normal":
        raise ValueError(f"unknown init {init!r}")
    return torch.randn(n, dim, generator=gen) * std


class BPRMF(SingleDomainModel):
    """Matrix factorisation trained with BPR (Rendle et al., 2009) on one domain.

    Users and items live in one table ``emb`` (users first), the layout the
    fused row-wise step (:class:`uclr_cli.optim.BPRRowStep`) updates in place.
    With ``item_bias`` the table has one more column: 1 in every user row and
    a learned bias in every item row (PGE's), so a score stays a dot product.
    """

    kind = "bprmf"

    def __init__(
        self,
        n_users: int,
        n_items: int,
        item_offset: int,
        dim: int,
        init_std: float = 0.1,
        gen=None,
        *,
        item_bias: bool = False,
        init: str = "normal",
    ):
        super().__init__(n_users, n_items, item_offset)
        users = _normal(n_users, dim, init_std, gen, init)
        items = _normal(n_items, dim, init_std, gen, init)
        if item_bias:
            users = torch.cat([users, torch.ones(n_users, 1)], 1)
            items = torch.cat([items, torch.zeros(n_items, 1)], 1)
        self.item_bias = item_bias
        self.emb = nn.Parameter(torch.cat([users, items]), requires_grad=False)

    @property
    def user_emb(self) -> Tensor:
        return self.emb[: self.n_users]

    @property
    def item_emb(self) -> Tensor:
        return self.emb[self.n_users :]

    def tables(self) -> tuple[Tensor, Tensor]:
        return self.user_emb.detach(), self.item_emb.detach()

    def tensors(self) -> dict[str, Tensor]:
        return {"user_emb": self.user_emb.detach(), "item_emb": self.item_emb.detach()}


class NeuMF(SingleDomainModel):
    """Neural matrix factorisation (He et al., 2017): GMF and MLP towers fused by a final linear layer.

    ``kind`` is ``neumf`` (both towers), or ``gmf`` / ``mlp`` (one tower
    alone, as pretrained before NeuMF). The towers have separate embeddings of
    size m. MLP: [p_u; q_i] (2m) -> mlp_layers, ReLU after each; the output
    layer maps [GMF vector; MLP vector] to a logit. The first MLP layer is
    applied as W_u·p_u + W_i·q_i + b (the same maths as on the concatenation),
    so scoring can precompute both halves once per user and item.
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        item_offset: int,
        dim: int,
        mlp_layers: list[int],
        kind: str = "neumf",
        init_std: float = 0.1,
        gen=None,
        *,
        init: str = "normal",
    ):
        super().__init__(n_users, n_items, item_offset)
        if kind not in ("neumf", "gmf", "mlp"):
            raise ValueError(f"unknown NeuMF kind {kind!r}")
        self.kind, self.dim = kind, dim
        self.has_gmf, self.has_mlp = kind in ("neumf", "gmf"), kind in ("neumf", "mlp")
        width = 0
        if self.has_gmf:
            self.gmf_user = nn.Parameter(_normal(n_users, dim, init_std, gen, init))
            self.gmf_item = nn.Parameter(_normal(n_items, dim, init_std, gen, init))
            width += dim
        with torch.random.fork_rng(devices=[]):  # nn.Linear draws from the global RNG; we re-initialise below
            sizes = [2 * dim, *mlp_layers] if self.has_mlp else []
            self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
            if self.has_mlp:
                self.mlp_user = nn.Parameter(_normal(n_users, dim, init_std, gen, init))
                self.mlp_item = nn.Parameter(_normal(n_items, dim, init_std, gen, init))
                width += mlp_layers[-1]
            self.out = nn.Linear(width, 1)
        init_linears(self, gen)

    def embedding_names(self) -> list[str]:
        """The embedding tables (sparse gradients, row-wise Adam); the rest are dense layers."""
        return [n for n in ("gmf_user", "gmf_item", "mlp_user", "mlp_item") if hasattr(self, n)]

    def _first_user(self, p: Tensor) -> Tensor:
        w = self.mlp[0].weight
        return F.linear(p, w[:, : self.dim], self.mlp[0].bias)

    def _first_item(self, q: Tensor) -> Tensor:
        return F.linear(q, self.mlp[0].weight[:, self.dim :])

    def _head(self, gmf: Tensor | None, h: Tensor | None) -> Tensor:
        """Logits from the GMF product and the first MLP layer's pre-activation."""
        parts = []
        if gmf is not None:
            parts.append(gmf)
        if h is not None:
            h = F.relu(h)
            for lin in self.mlp[1:]:
                h = F.relu(lin(h))
            parts.append(h)
        return self.out(torch.cat(parts, -1)).squeeze(-1)

    def forward(self, users: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (B,) of (user, global item) pairs and the squared norms (B,) of the embedding rows used."""
        loc = items - self.item_offset
        gmf = h = None
        sq = torch.zeros(users.shape, dtype=torch.float32, device=users.device)
        if self.has_gmf:
            pu, qi = F.embedding(users, self.gmf_user, sparse=True), F.embedding(loc, self.gmf_item, sparse=True)
            gmf = pu * qi
            sq = sq + pu.pow(2).sum(1) + qi.pow(2).sum(1)
        if self.has_mlp:
            pu, qi = F.embedding(users, self.mlp_user, sparse=True), F.embedding(loc, self.mlp_item, sparse=True)
            h = self._first_user(pu) + self._first_item(qi)
            sq = sq + pu.pow(2).sum(1) + qi.pow(2).sum(1)
        return self._head(gmf, h), sq

    @torch.no_grad()
    def scorer(self) -> Scorer:
        hu = self._first_user(self.mlp_user) if self.has_mlp else None
        hi = self._first_item(self.mlp_item) if self.has_mlp else None

        def score(users: Tensor, items: Tensor) -> Tensor:
            loc = items - self.item_offset
            gmf = self.gmf_user[users].unsqueeze(1) * self.gmf_item[loc] if self.has_gmf else None
            h = hu[users].unsqueeze(1) + hi[loc] if self.has_mlp else None
            return self._head(gmf, h)

        return score

    @torch.no_grad()
    def init_from_towers(self, gmf: NeuMF, mlp: NeuMF, alpha: float = 0.5) -> None:
        """NeuMF from pretrained GMF and MLP models: their weights, output layer [α·h_gmf, (1-α)·h_mlp]."""
        if self.kind != "neumf" or gmf.kind != "gmf" or mlp.kind != "mlp":
            raise ValueError("init_from_towers needs a NeuMF model, a GMF tower and an MLP tower")
        self.gmf_user.copy_(gmf.gmf_user)
        self.gmf_item.copy_(gmf.gmf_item)
        self.mlp_user.copy_(mlp.mlp_user)
        self.mlp_item.copy_(mlp.mlp_item)
        for mine, theirs in zip(self.mlp, mlp.mlp):
            mine.load_state_dict(theirs.state_dict())
        self.out.weight.copy_(torch.cat([alpha * gmf.out.weight, (1 - alpha) * mlp.out.weight], dim=1))
        self.out.bias.copy_(alpha * gmf.out.bias + (1 - alpha) * mlp.out.bias)


def normalized_graph(users: Tensor, items: Tensor, n_users: int, n_items: int) -> Tensor:
    """D^-1/2 A D^-1/2 of the bipartite user-item graph as a sparse CSR (U+I, U+I) matrix.

    ``items`` are local (0..n_items-1) ids; nodes are users then items. A pair
    seen several times is one edge. A node without edges gets a zero row
    (its degree's inverse square root is taken as 0, not inf).
    """
    n = n_users + n_items
    key = torch.unique(users.to(torch.int64) * n_items + items.to(torch.int64))
    u, i = key // n_items, key % n_items
    deg = torch.cat([torch.bincount(u, minlength=n_users), torch.bincount(i, minlength=n_items)]).to(torch.float32)
    dinv = torch.where(deg > 0, deg.clamp(min=1).pow(-0.5), torch.zeros_like(deg))
    rows = torch.cat([u, i + n_users])
    cols = torch.cat([i + n_users, u])
    order = torch.argsort(rows * n + cols)
    rows, cols = rows[order], cols[order]
    vals = dinv[rows] * dinv[cols]
    crow = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we use only mm
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, vals, (n, n), check_invariants=False)


class _SymmetricSpMM(torch.autograd.Function):
    """y = Â·x for a symmetric sparse Â; the backward is Â·grad (no transpose needed)."""

    @staticmethod
    def forward(ctx, x: Tensor, graph: Tensor) -> Tensor:
        ctx.graph = graph
        return torch.sparse.mm(graph, x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return torch.sparse.mm(ctx.graph, grad.contiguous()), None


class LightGCN(SingleDomainModel):
    """LightGCN (He et al., 2020): K propagations over the normalised graph, mean of layers 0..K.

    The learned weights are the ego (layer-0) embeddings; the graph is data,
    built once from the domain's train interactions (:func:`normalized_graph`)
    and never a dense |U|x|I| matrix. It is not a module buffer: build it on
    the device the model is moved to.
    """

    kind = "lightgcn"

    def __init__(
        self,
        n_users: int,
        n_items: int,
        item_offset: int,
        dim: int,
        layers: int,
        graph: Tensor,
        init_std: float = 0.1,
        gen=None,
        *,
        init: str = "normal",
    ):
        super().__init__(n_users, n_items, item_offset)
        if tuple(graph.shape) != (n_users + n_items, n_users + n_items):
            raise ValueError(f"graph is {tuple(graph.shape)}, expected {(n_users + n_items,) * 2}")
        self.layers, self.graph = layers, graph
        self.user_emb = nn.Parameter(_normal(n_users, dim, init_std, gen, init))
        self.item_emb = nn.Parameter(_normal(n_items, dim, init_std, gen, init))

    def propagate(self) -> tuple[Tensor, Tensor]:
        """Final user and item embeddings: mean of the K+1 layer outputs (differentiable)."""
        x = torch.cat([self.user_emb, self.item_emb])
        acc = x
        for _ in range(self.layers):
            x = _SymmetricSpMM.apply(x, self.graph)
            acc = acc + x
        out = acc / (self.layers + 1)
        return out[: self.n_users], out[self.n_users :]

    def tables(self) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return self.propagate()

    def objective(self, u: Tensor, i: Tensor, j: Tensor, reg) -> Tensor:
        """BPR on the propagated embeddings + L2 on the batch's ego rows (``i``, ``j`` local);
        ``reg`` one λ or (user, positive, negative)."""
        users, items = self.propagate()
        eu = users[u]
        loss = bpr_loss((eu * items[i]).sum(1), (eu * items[j]).sum(1))
        return loss + l2_term(self.user_emb[u], self.item_emb[i], self.item_emb[j], reg)
