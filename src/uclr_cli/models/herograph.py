"""HeroGraph (Cui et al., 2020), reconstructed from the paper's description (its code is not public).

Pure building blocks, no I/O. Our reading, and where it is a choice: docs/training.md.

* :class:`SharedGraph`: one graph over every domain, built from train rows
  only: nodes are the users ``0..U-1`` (shared by the domains), then every
  domain's items at ``U + global item id``; a user's neighbours are its train
  items of all domains, an item's its train users. CSR, no dense matrix.
* :meth:`SharedGraph.sample`: at most ``k`` neighbours per node, drawn
  uniformly without replacement (all of them for a node with ``k`` or fewer),
  as an ``(n_nodes, k)`` table padded with -1: one random key per edge, two
  stable sorts and a scatter, no loop over nodes.
* :class:`RecurrentAttention`: the cross-domain embedding of a node: ``h_0``
  is its row of the shared graph table; each of the T steps attends over the
  node's sampled neighbours with ``h_{t-1}`` as the query,
  ``a_j = softmax_j((W h_{t-1} + b) · g_j / sqrt(K))``, ``c_t = sum_j a_j g_j``,
  and ``h_t = GRUCell(c_t, h_{t-1})``; a batch of nodes at once, grouped by
  neighbour count (:func:`by_width`) so that few-neighbour nodes are not padded to ``k``.
* :class:`HeroGraph`: the joint model: per-domain user tables ``E_u^d``, the
  item table ``E_i`` (domain d's items are its global range, so the per-domain
  item tables are slices), the shared graph table ``g`` and one recurrent
  attention per node type (users attend over items, items over users). The
  score in domain d is ``E_u^d · E_i + h_u · h_i``.
* :class:`HeroTarget`: the scorer of one domain, what a checkpoint holds:
  ``[E_u^d, h_u] · [E_i, h_i]``, a dot product of concatenated tables.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uclr_cli.losses import bpr_loss, l2_term
from uclr_cli.models.baselines import SingleDomainModel, init_linears
from uclr_cli.models.ga_mtcdr import Graph

#: an attention logit of a padded neighbour slot: left out of the softmax
_MASKED = -1e9
#: nodes whose graph vectors are computed at once when scoring (bounds the (chunk, k, K) neighbour gather)
CHUNK = 4096


class SharedGraph(Graph):
    """The train interactions of every domain as one undirected graph over users, then items (CSR; GA-MTCDR's
    graph built over all domains at once), with neighbour sampling."""

    def sample(self, k: int, gen: torch.Generator) -> Tensor:
        """(n_nodes, k) neighbours: per node a uniform sample of at most ``k`` without replacement, -1 padded."""
        n_edges = len(self.col)
        order = torch.argsort(torch.rand(n_edges, generator=gen, device=self.col.device), stable=True)
        order = order[torch.argsort(self.src[order], stable=True)]  # rows in order, a random order inside each
        rank = torch.arange(n_edges, device=self.col.device) - self.rowptr[self.src]  # position inside the row
        keep = rank < k
        out = torch.full((self.n_nodes, k), -1, dtype=torch.int64, device=self.col.device)
        out[self.src[keep], rank[keep]] = self.col[order][keep]
        return out


class RecurrentAttention(nn.Module):
    """T steps of attention over a node's sampled neighbours, each feeding a GRU cell (the node's row is h_0)."""

    def __init__(self, dim: int, steps: int):
        super().__init__()
        self.dim, self.steps = dim, steps
        # (W h + b) · g_j: a bilinear form of query and neighbour, the product of query and key projections
        self.query = nn.Linear(dim, dim)
        self.gru = nn.GRUCell(dim, dim)

    def forward(self, h: Tensor, nbr: Tensor, mask: Tensor) -> Tensor:
        """h (M, K) the nodes' rows, nbr (M, k, K) their neighbours' rows, mask (M, k) the slots that hold one.
        A node without neighbours gets c_t = 0 at every step."""
        scale = 1.0 / math.sqrt(self.dim)
        for _ in range(self.steps):  # a loop over the T steps; every node moves at once
            logits = torch.bmm(nbr, self.query(h).unsqueeze(2)).squeeze(2) * scale
            w = torch.softmax(logits.masked_fill(~mask, _MASKED), dim=1) * mask
            h = self.gru(torch.bmm(w.unsqueeze(1), nbr).squeeze(1), h)
        return h


def by_width(agg: RecurrentAttention, table: Tensor, nodes: Tensor, nbrs: Tensor, mask: Tensor) -> Tensor:
    """``agg`` of the (M,) ``nodes`` over their (M, k) neighbours ``nbrs`` (rows of ``table``; ``mask`` the real
    ones), the nodes grouped by neighbour count into widths 1, 2, 4, ..., k, each group gathered and padded only
    to its width. The same numbers as one (M, k) pass (a padded slot has weight exactly 0), at a fraction of
    the memory traffic: most items have a few neighbours. A sample is left-packed (a node's neighbours fill its
    first slots), so a group's first ``w`` slots hold all of them."""
    k = mask.shape[1]
    count = mask.sum(1)
    widths = sorted({min(1 << p, k) for p in range(k.bit_length() + 1)})
    groups, below = [], -1
    for w in widths:
        rows = torch.nonzero((count > below) & (count <= w)).squeeze(1)
        below = w
        if len(rows):
            groups.append((w, rows))
    if not groups:
        return table.new_zeros(0, table.shape[1])
    # one gather for every group (F.embedding: faster than indexing on the CPU; one dense scatter back in training)
    idx = [t for w, rows in groups for t in (nodes[rows], nbrs[rows, :w].reshape(-1))]
    rows_of = torch.split(F.embedding(torch.cat(idx), table), [len(t) for t in idx])
    outs, order = [], []
    for n, (w, rows) in enumerate(groups):
        own, nb = rows_of[2 * n], rows_of[2 * n + 1].view(len(rows), w, -1)
        outs.append(agg(own, nb, mask[rows, :w]))
        order.append(rows)
    perm = torch.cat(order)
    back = torch.empty_like(perm)
    back[perm] = torch.arange(len(perm), device=perm.device)
    return torch.cat(outs)[back]


class HeroGraph(nn.Module):
    """The joint model of every domain. The tables are trained row-wise (only the rows a step reads), so they are
    parameters without autograd: :meth:`objective` reads them through leaf copies of the rows it needs."""

    def __init__(
        self,
        n_users: int,
        item_offsets: list[int],
        dim: int,
        steps: int = 2,
        init_std: float = 0.1,
        gen: torch.Generator | None = None,
    ):
        super().__init__()
        self.n_users, self.item_offsets, self.dim = n_users, list(item_offsets), dim
        n_dom, n_items = len(item_offsets) - 1, item_offsets[-1]
        self.n_domains, self.n_items = n_dom, n_items

        def table(rows: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(rows, dim, generator=gen) * init_std, requires_grad=False)

        self.users = table(n_dom * n_users)  # E_u^d: row d·U + u
        self.items = table(n_items)  # E_i over the global item index
        self.graph = table(n_users + n_items)  # the shared graph's node table g
        with torch.random.fork_rng(devices=[]):  # the default inits read the global RNG; redone from gen
            self.user_agg, self.item_agg = RecurrentAttention(dim, steps), RecurrentAttention(dim, steps)
        init_linears(self, gen)
        bound = 1.0 / math.sqrt(dim)  # GRUCell's own init, from gen
        with torch.no_grad():
            for agg in (self.user_agg, self.item_agg):
                for p in agg.gru.parameters():
                    p.uniform_(-bound, bound, generator=gen)

    def tables(self) -> dict[str, Tensor]:
        """The tables trained row-wise, by name."""
        return {"users": self.users.data, "items": self.items.data, "graph": self.graph.data}

    def dense_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The aggregators' weights (trained with dense Adam), by name."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def objective(
        self, d: int, u: Tensor, i: Tensor, j: Tensor, nbrs: Tensor, reg: float
    ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
        """BPR in domain ``d`` on (user u, positive i, negative j; items global) + reg·L2 of the final vectors,
        and the table rows it read: ``{table: (row ids, leaf rows)}``, whose ``.grad`` after backward are the
        row gradients. ``nbrs`` is the (n_nodes, k) neighbour sample."""
        n_u = self.n_users
        uu, u_inv = torch.unique(u, return_inverse=True)  # every node's graph vector once
        ii, i_inv = torch.unique(torch.cat([i, j]), return_inverse=True)
        nb_u, nb_i = nbrs[uu], nbrs[n_u + ii]
        mask_u, mask_i = nb_u >= 0, nb_i >= 0
        # a padded slot points at the node itself (a row read anyway; masked out, so no gradient reaches it)
        nb_u = torch.where(mask_u, nb_u, uu.unsqueeze(1))
        nb_i = torch.where(mask_i, nb_i, (n_u + ii).unsqueeze(1))
        parts = [uu, n_u + ii, nb_u.reshape(-1), nb_i.reshape(-1)]
        g_rows, inv = torch.unique(torch.cat(parts), return_inverse=True)
        at_u, at_i, at_nu, at_ni = torch.split(inv, [len(p) for p in parts])
        g = self.graph.detach()[g_rows].requires_grad_()
        hu = by_width(self.user_agg, g, at_u, at_nu.view_as(nb_u), mask_u)
        hi = by_width(self.item_agg, g, at_i, at_ni.view_as(nb_i), mask_i)
        eu = self.users.detach()[d * n_u + uu].requires_grad_()
        ei = self.items.detach()[ii].requires_grad_()
        # index_select, not [inv]: its backward (index_add_) sums duplicates in a fixed order on the CPU; the
        # backward of advanced indexing (index_put_ with accumulate) does not once it runs on several threads
        fu, fi = torch.cat([eu, hu], 1).index_select(0, u_inv), torch.cat([ei, hi], 1).index_select(0, i_inv)
        fp, fn = fi[: len(u)], fi[len(u) :]
        loss = bpr_loss((fu * fp).sum(1), (fu * fn).sum(1)) + l2_term(fu, fp, fn, reg)
        return loss, {"users": (d * n_u + uu, eu), "items": (ii, ei), "graph": (g_rows, g)}

    @torch.no_grad()
    def graph_vectors(self, nodes: Tensor, nbrs: Tensor, users: bool, chunk: int = CHUNK) -> Tensor:
        """h (M, K) of graph nodes ``nodes`` (all users, or all items) under the neighbour sample ``nbrs``."""
        agg = self.user_agg if users else self.item_agg
        out = []
        for s in range(0, len(nodes), chunk):
            n = nodes[s : s + chunk]
            nb = nbrs[n]
            out.append(by_width(agg, self.graph, n, nb.clamp(min=0), nb >= 0))
        return torch.cat(out) if out else self.graph.new_zeros(0, self.dim)

    @torch.no_grad()
    def target_tensors(self, d: int, graph_users: Tensor, nbrs: Tensor) -> dict[str, Tensor]:
        """What :class:`HeroTarget` of domain ``d`` holds; ``graph_users`` = h of every user (shared by domains)."""
        lo, hi = self.item_offsets[d], self.item_offsets[d + 1]
        items = torch.arange(lo, hi, device=self.items.device) + self.n_users
        return {
            "users": self.users[d * self.n_users : (d + 1) * self.n_users].clone(),
            "items": self.items[lo:hi].clone(),
            "graph_users": graph_users,
            "graph_items": self.graph_vectors(items, nbrs, users=False),
        }


class HeroTarget(SingleDomainModel):
    """HeroGraph's scorer of one domain: ``E_u^d · E_i + h_u · h_i`` as one dot product of concatenated tables."""

    kind = "herograph"

    def __init__(self, n_users: int, n_items: int, item_offset: int, dim: int):
        super().__init__(n_users, n_items, item_offset)
        self.dim = dim
        self.users = nn.Parameter(torch.zeros(n_users, dim), requires_grad=False)
        self.items = nn.Parameter(torch.zeros(n_items, dim), requires_grad=False)
        self.graph_users = nn.Parameter(torch.zeros(n_users, dim), requires_grad=False)
        self.graph_items = nn.Parameter(torch.zeros(n_items, dim), requires_grad=False)

    @torch.no_grad()
    def tables(self) -> tuple[Tensor, Tensor]:
        return torch.cat([self.users, self.graph_users], 1), torch.cat([self.items, self.graph_items], 1)
