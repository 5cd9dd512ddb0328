"""GA-MTCDR (Zhu et al., TKDE 2023), interaction-only: graph embeddings per domain, element-wise attention, towers.

Pure building blocks, no I/O. The original also puts text-similarity edges
(Doc2Vec of reviews and profiles) into each domain's graph; we have no text,
so a domain's graph is its user-item train edges only.

* :class:`Graph`: one domain's bipartite train graph in CSR form (nodes: users
  0..U-1, then the domain's items U..U+I-1), built from train rows only.
* :func:`random_walks`: DeepWalk's uniform walks, every walk advanced one step
  at a time for all walks at once (tensor ops, no Python loop over nodes).
* :func:`window_pairs`: the (centre, context) pairs of walks under word2vec's
  reduced window (per centre a window b uniform in 1..window).
* :class:`SkipGram`: skip-gram with negative sampling, in and out tables,
  analytic gradients applied by ``index_add_`` (SGD as word2vec does).
* :class:`GATarget`: the model of one target domain d, a dot-product scorer of
  unit vectors (cosine): every domain k's frozen user node vector projected by
  ``P_k`` (K x K, shared by the targets), mixed by element-wise attention
  ``u~ = sum_k softmax_k(theta_d[u, k, :]) * P_k x_k`` (theta zero at start, so
  the mix starts as the mean), then the user tower; the item side is the
  target's frozen item node vector, its projection and the item tower.
  Towers: Linear+ReLU over [K, 2K, 4K, 8K, 4K, 2K, K] (``tower_widths``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uclr_cli.models.baselines import SingleDomainModel, init_linears

#: the original's tower widths as multiples of K
TOWER = (1, 2, 4, 8, 4, 2, 1)
#: a domain the user has no train rows in gets this attention logit: left out of the softmax
_MASKED = -1e9
#: cosine clamped into (0, 1) before the log loss, as the original clamps at 1e-6
_CLAMP = 1e-6


class Graph:
    """One domain's user-item train graph, undirected, in CSR form over users then items."""

    def __init__(self, users: Tensor, items: Tensor, n_users: int, n_items: int):
        self.n_users, self.n_items = n_users, n_items
        n = n_users + n_items
        key = torch.unique(users.to(torch.int64) * n_items + items.to(torch.int64))  # one edge per pair
        u, i = key // n_items, key % n_items + n_users
        src, dst = torch.cat([u, i]), torch.cat([i, u])
        order = torch.argsort(src * n + dst)
        self.src, self.col = src[order], dst[order]  # edges sorted by source node, then target
        self.degree = torch.bincount(src, minlength=n)
        self.rowptr = torch.zeros(n + 1, dtype=torch.int64, device=users.device)
        self.rowptr[1:] = torch.cumsum(self.degree, 0)

    @property
    def n_nodes(self) -> int:
        return self.n_users + self.n_items

    def nodes_with_edges(self) -> Tensor:
        return torch.nonzero(self.degree > 0).squeeze(1)


def random_walks(graph: Graph, starts: Tensor, length: int, gen: torch.Generator) -> Tensor:
    """(W, length) uniform random walks from ``starts`` (nodes with edges): each step a uniform neighbour."""
    walks = torch.empty(len(starts), length, dtype=torch.int64, device=starts.device)
    walks[:, 0] = starts
    for t in range(1, length):  # a loop over steps; every walk moves at once
        cur = walks[:, t - 1]
        deg = graph.degree[cur]
        r = torch.rand(len(cur), generator=gen, device=cur.device, dtype=torch.float64)
        pick = torch.minimum((r * deg).long(), deg - 1)
        walks[:, t] = graph.col[graph.rowptr[cur] + pick]
    return walks


def window_pairs(walks: Tensor, window: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(centre, context) node pairs of ``walks`` (W, L) under word2vec's reduced window: centre position p
    keeps the contexts at distance 1..b_p on each side, b_p uniform in 1..window."""
    b = torch.randint(1, window + 1, walks.shape, generator=gen, device=walks.device)
    centres, contexts = [], []
    for o in range(1, min(window, walks.shape[1] - 1) + 1):
        left, right = walks[:, :-o], walks[:, o:]
        keep = b[:, :-o] >= o  # centre on the left, context o steps later
        centres.append(left[keep])
        contexts.append(right[keep])
        keep = b[:, o:] >= o  # centre on the right, context o steps earlier
        centres.append(right[keep])
        contexts.append(left[keep])
    if not centres:
        empty = walks.new_zeros(0)
        return empty, empty
    return torch.cat(centres), torch.cat(contexts)


class SkipGram:
    """Skip-gram with negative sampling over one graph's nodes (word2vec's SGNS).

    ``inp`` (the node vectors kept) starts uniform in ±0.5/K, ``out`` at zero,
    as word2vec. Negatives are drawn in proportion to degree^0.75 (word2vec's
    unigram^0.75; a walk visits a node in proportion to its degree). A step
    adds every pair's SGD update with ``index_add_`` (pairs of one batch see
    the same tables, as word2vec's parallel workers roughly do).
    """

    def __init__(self, n_nodes: int, dim: int, degree: Tensor, gen: torch.Generator | None = None):
        self.dim = dim
        self.inp = (torch.rand(n_nodes, dim, generator=gen) - 0.5) / dim
        self.out = torch.zeros(n_nodes, dim)
        w = degree.to(torch.float64).pow(0.75)
        self.cdf = torch.cumsum(w, 0) / w.sum().clamp(min=1e-12)

    def to(self, device) -> SkipGram:
        self.inp, self.out, self.cdf = self.inp.to(device), self.out.to(device), self.cdf.to(device)
        return self

    def negatives(self, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
        r = torch.rand(shape, generator=gen, device=self.cdf.device, dtype=torch.float64)
        return torch.searchsorted(self.cdf, r).clamp_(max=len(self.cdf) - 1)

    @torch.no_grad()
    def step(self, centre: Tensor, context: Tensor, negs: Tensor, lr: float) -> Tensor:
        """One SGD step on the pairs (P,) and their negatives (P, n); returns the summed loss."""
        # F.embedding: a faster gather than indexing on the CPU
        v, uo, un = F.embedding(centre, self.inp), F.embedding(context, self.out), F.embedding(negs, self.out)
        sp = (v * uo).sum(1)
        sn = torch.bmm(un, v.unsqueeze(2)).squeeze(2)
        loss = F.softplus(-sp).sum() + F.softplus(sn).sum()  # -log σ(s+) - Σ log σ(-s-)
        gp, gn = torch.sigmoid(sp) - 1, torch.sigmoid(sn)  # d loss / d score
        grad_v = gp.unsqueeze(1) * uo + torch.bmm(gn.unsqueeze(1), un).squeeze(1)
        self.out.index_add_(0, context, gp.unsqueeze(1) * v, alpha=-lr)
        self.out.index_add_(0, negs.reshape(-1), (gn.unsqueeze(2) * v.unsqueeze(1)).reshape(-1, self.dim), alpha=-lr)
        self.inp.index_add_(0, centre, grad_v, alpha=-lr)
        return loss

    def tensors(self) -> dict[str, Tensor]:
        return {"inp": self.inp, "out": self.out}


def tower_widths(dim: int) -> list[int]:
    return [m * dim for m in TOWER]


def _tower(dim: int) -> nn.Sequential:
    """Linear+ReLU between consecutive widths, the last layer included (the original's: outputs are >= 0)."""
    sizes = tower_widths(dim)
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


def attention_mix(x: Tensor, theta: Tensor, has: Tensor) -> Tensor:
    """sum_k softmax_k(theta[:, k, :]) * x[:, k, :] over the domains k with ``has`` (B, N); x, theta (B, N, K).
    A user without train rows in any domain gets the zero vector."""
    logits = torch.where(has.unsqueeze(2), theta, torch.full_like(theta, _MASKED))
    w = torch.softmax(logits, dim=1) * has.unsqueeze(2)
    return (w * x).sum(1)


class GATarget(SingleDomainModel):
    """GA-MTCDR's model of one target domain: attention over every domain's projected user node vectors, towers,
    cosine. ``user_nodes`` (N, U, K), ``has`` (N, U) and ``item_nodes`` (I_d, K) are frozen buffers."""

    kind = "ga-mtcdr"

    def __init__(
        self, n_users: int, n_items: int, item_offset: int, dim: int, n_domains: int, gen: torch.Generator | None = None
    ):
        super().__init__(n_users, n_items, item_offset)
        self.dim, self.n_domains = dim, n_domains
        self.register_buffer("user_nodes", torch.zeros(n_domains, n_users, dim))
        self.register_buffer("has", torch.zeros(n_domains, n_users, dtype=torch.bool))
        self.register_buffer("item_nodes", torch.zeros(n_items, dim))
        self.user_proj = nn.Parameter(torch.zeros(n_domains, dim, dim))  # P_k, shared by the targets in training
        self.theta = nn.Parameter(torch.zeros(n_users, n_domains, dim))  # zero: the mix starts as the mean
        with torch.random.fork_rng(devices=[]):  # nn.Linear's init reads the global RNG; redone from gen
            self.item_proj = nn.Linear(dim, dim, bias=False)
            self.user_tower, self.item_tower = _tower(dim), _tower(dim)
        init_linears(self.user_tower, gen)
        init_linears(self.item_tower, gen)
        with torch.no_grad():
            self.item_proj.weight.copy_(_xavier((dim, dim), gen))
            self.user_proj.copy_(torch.stack([_xavier((dim, dim), gen) for _ in range(n_domains)]))

    def share(self, other: GATarget) -> None:
        """Use ``other``'s projections and frozen user tables (one joint model over the targets)."""
        self.user_proj = other.user_proj
        self.user_nodes, self.has = other.user_nodes, other.has

    def user_vectors(self, u: Tensor) -> Tensor:
        """User tower outputs (B, K) of users ``u``."""
        x = torch.bmm(self.user_nodes[:, u], self.user_proj.transpose(1, 2)).transpose(0, 1)  # (B, N, K): P_k x_k
        return self.user_tower(attention_mix(x, self.theta[u], self.has[:, u].T))

    def item_vectors(self, i: Tensor) -> Tensor:
        """Item tower outputs (B, K) of local items ``i``."""
        return self.item_tower(self.item_proj(self.item_nodes[i]))

    def objective(self, u: Tensor, items: Tensor, labels: Tensor, reg: float) -> Tensor:
        """Mean binary log loss of cos(user u, item) against ``labels`` (1 positive, 0 negative) over the (B, C)
        pairs of ``items`` (local ids), + reg·mean of the pairs' squared tower-output norms (the original's L2)."""
        uniq, inv = torch.unique(items, return_inverse=True)  # the item tower once per distinct item
        # index_select: its backward sums a repeated item's gradients in a fixed order on several CPU threads
        # (advanced indexing's backward, index_put_ with accumulate, does not)
        ei = self.item_vectors(uniq).index_select(0, inv.reshape(-1)).view(*inv.shape, -1)  # (B, C, K)
        eu = self.user_vectors(u)  # (B, K)
        cos = (F.normalize(ei, dim=2) * F.normalize(eu, dim=1).unsqueeze(1)).sum(2)
        y = cos.clamp(_CLAMP, 1 - _CLAMP)
        loss = F.binary_cross_entropy(y, labels)
        if reg:
            loss = loss + reg * ((eu * eu).sum(1).unsqueeze(1) + (ei * ei).sum(2)).mean()
        return loss

    @torch.no_grad()
    def tables(self, chunk: int = 16384) -> tuple[Tensor, Tensor]:
        """Unit user and item vectors: their dot products are the cosine scores."""
        dev = self.theta.device
        users = torch.arange(self.n_users, device=dev)
        items = torch.arange(self.n_items, device=dev)
        u = [self.user_vectors(users[s : s + chunk]) for s in range(0, self.n_users, chunk)]
        i = [self.item_vectors(items[s : s + chunk]) for s in range(0, self.n_items, chunk)]
        empty = self.theta.new_zeros(0, self.dim)
        return F.normalize(torch.cat(u) if u else empty, dim=1), F.normalize(torch.cat(i) if i else empty, dim=1)


def _xavier(shape: tuple[int, int], gen: torch.Generator | None) -> Tensor:
    w = torch.empty(shape)
    nn.init.xavier_uniform_(w, generator=gen)
    return w
