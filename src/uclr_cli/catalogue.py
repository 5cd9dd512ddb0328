"""Whole-catalogue scoring of one domain: top-K lists and the full-protocol rank of a positive.

Pure tensor code, no I/O. A model is a function ``score(users (c,)) -> (c, I_d)``
giving every item of the domain a score for each user of a chunk (a dot
product of the user and item tables for every model but NeuMF). Users are
processed ``chunk`` at a time, so memory is O(chunk x I_d), never users x items,
and there is no Python loop over users or items inside a chunk.

Per-user item sets to leave out (the user's train items, and on the test split
the valid item) come as a CSR pair ``(indptr (U+1,), cols (nnz,))`` of local item
indices (0..I_d-1), built once by :func:`exclusion_csr`.

Conventions (docs/design.md §4):

* **top-K** orders by score, higher first; **ties go to the lower item index**;
  a NaN score ranks below every number; an excluded item, or one scoring -inf,
  is never listed (a user with fewer than K candidate items gets a shorter list,
  padded with index -1 and score -inf).
* **full rank** of a positive = 1 + #{candidate items other than it scoring at
  least as high}, candidates = the domain's items minus the excluded ones; ties
  and NaN scores count against the positive, as in :mod:`uclr_cli.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ScoreFn", "dot_scores", "exclusion_csr", "full_chunk", "topk_items", "full_ranks", "n_candidates"]

ScoreFn = Callable[[Tensor], Tensor]

#: Scores held at once per chunk (elements of the (chunk, I_d) matrix): 64 MB of float32 on CPU, 1 GB on CUDA.
#: On CPU a larger chunk makes the (chunk, m) x (m, I_d) product faster per user (measured at the Amazon shape).
CPU_BUDGET = 1 << 24
ACCEL_BUDGET = 1 << 28


def full_chunk(n_items: int, device: torch.device, width: int = 1) -> int:
    """Users per chunk so that a (chunk, n_items, width) score computation stays within the device's budget."""
    budget = CPU_BUDGET if device.type == "cpu" else ACCEL_BUDGET
    return max(1, budget // max(1, n_items * width))


def dot_scores(user_vecs: Tensor, item_vecs: Tensor) -> ScoreFn:
    """``users -> user_vecs[users] @ item_vecs.T``: scores of every item of a domain table."""

    def score(users: Tensor) -> Tensor:
        return torch.index_select(user_vecs, 0, users) @ item_vecs.T

    return score


def exclusion_csr(users: Tensor, items: Tensor, n_users: int, n_items: int) -> tuple[Tensor, Tensor]:
    """CSR ``(indptr (n_users+1,), cols)`` of the distinct local items each user leaves out, cols sorted per user."""
    users, items = users.to(torch.int64), items.to(torch.int64)
    if len(items) and (int(items.min()) < 0 or int(items.max()) >= n_items):
        raise ValueError(f"excluded items outside [0, {n_items})")
    key = torch.unique(users * n_items + items)  # sorted: by user, then item
    u, cols = key // n_items, key % n_items
    indptr = torch.zeros(n_users + 1, dtype=torch.int64, device=users.device)
    indptr[1:] = torch.cumsum(torch.bincount(u, minlength=n_users), 0)
    return indptr, cols


def n_candidates(users: Tensor, n_items: int, excl: tuple[Tensor, Tensor] | None) -> Tensor:
    """(R,) number of candidate items per row's user: the domain's items minus the excluded ones."""
    full = torch.full(users.shape, n_items, dtype=torch.int64, device=users.device)
    if excl is None:
        return full
    indptr = excl[0].to(users.device)
    return full - (indptr[users + 1] - indptr[users])


def _chunk_pairs(excl: tuple[Tensor, Tensor], users: Tensor) -> tuple[Tensor, Tensor]:
    """(row in chunk, local item) of every excluded pair of the chunk's users, without a Python loop."""
    indptr, cols = excl
    start, stop = indptr[users], indptr[users + 1]
    counts = stop - start
    rows = torch.repeat_interleave(torch.arange(len(users), device=users.device), counts)
    # position of each pair inside its user's run of cols
    offs = torch.arange(int(counts.sum()), device=users.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts
    )
    return rows, cols[torch.repeat_interleave(start, counts) + offs]


def _order(idx: Tensor, vals: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by value (higher first), equal values by lower index."""
    idx, perm = torch.sort(idx, dim=1)
    vals = torch.gather(vals, 1, perm)
    vals, perm = torch.sort(vals, dim=1, descending=True, stable=True)
    return torch.gather(idx, 1, perm), vals


def _topk_chunk(s: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k (idx, vals) of each row of ``s`` (c, I), ties to the lower index; NaN below -inf."""
    n = s.shape[1]
    kk = min(k + 1, n)  # one more: a k-th value equal to the next one is a tie across the cut
    vals, idx = torch.topk(s, kk, dim=1)
    nan_rows = torch.isnan(vals).any(1)
    if bool(nan_rows.any()):  # topk puts NaN first: rank NaN last, then redo those rows
        s[nan_rows] = torch.nan_to_num(s[nan_rows], nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
        vals[nan_rows], idx[nan_rows] = torch.topk(s[nan_rows], kk, dim=1)
    tied = vals[:, k - 1] == vals[:, k] if kk > k else torch.zeros(len(s), dtype=torch.bool, device=s.device)
    idx, vals = idx[:, :k].contiguous(), vals[:, :k].contiguous()
    if bool(tied.any()):  # which of the tied items make the list: the lower indices
        st, tt = s[tied], vals[tied][:, -1:]
        gt, eq = st > tt, st == tt
        need = k - gt.sum(1, keepdim=True)
        take = gt | (eq & (torch.cumsum(eq, 1) <= need))
        cols = take.nonzero()[:, 1].view(-1, k)  # exactly k per row, ascending
        idx[tied], vals[tied] = cols, torch.gather(st, 1, cols)
    return _order(idx, vals)


@torch.no_grad()
def topk_items(
    score: ScoreFn,
    users: Tensor,
    n_items: int,
    k: int,
    exclude: tuple[Tensor, Tensor] | None = None,
    chunk: int = 256,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` local item indices (R, k) int64 and scores (R, k) of each user of ``users`` (R,).

    ``exclude`` (CSR of :func:`exclusion_csr`) items get -inf and are never listed:
    their slots are index -1, score -inf. ``k`` larger than the catalogue is cut to it.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    k = min(k, n_items)
    out_idx, out_val = [], []
    for s0 in range(0, len(users), chunk):
        u = users[s0 : s0 + chunk]
        s = score(u)
        if s.shape != (len(u), n_items):
            raise ValueError(f"score function gave {tuple(s.shape)}, expected {(len(u), n_items)}")
        s = s if s.dtype.is_floating_point else s.double()
        if exclude is not None:
            rows, cols = _chunk_pairs(exclude, u)
            s[rows, cols] = -torch.inf
        idx, vals = _topk_chunk(s, k)
        idx = torch.where(vals == -torch.inf, torch.full_like(idx, -1), idx)
        out_idx.append(idx)
        out_val.append(vals)
    if not out_idx:
        return torch.empty((0, k), dtype=torch.int64, device=users.device), torch.empty((0, k), device=users.device)
    return torch.cat(out_idx), torch.cat(out_val)


@torch.no_grad()
def full_ranks(
    score: ScoreFn,
    users: Tensor,
    pos: Tensor,
    n_items: int,
    exclude: tuple[Tensor, Tensor] | None = None,
    chunk: int = 256,
) -> Tensor:
    """Rank (R,) int64 of each row's positive ``pos`` (local index) among the domain's non-excluded items.

    One comparison pass per chunk: rank = #{items not scoring below the positive}
    (the positive itself included, so ties and NaN count against it) minus the
    excluded items among them. A NaN positive gets the last rank.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    out = []
    for s0 in range(0, len(users), chunk):
        u, p = users[s0 : s0 + chunk], pos[s0 : s0 + chunk]
        s = score(u)
        if s.shape != (len(u), n_items):
            raise ValueError(f"score function gave {tuple(s.shape)}, expected {(len(u), n_items)}")
        ps = torch.gather(s, 1, p.unsqueeze(1))
        below = s < ps  # False for NaN on either side: NaN negatives and a NaN positive count against it
        # a bool sum is slow on CPU; its bytes summed into int32 are not (I_d < 2**31)
        rank = n_items - below.view(torch.uint8).sum(1, dtype=torch.int32).to(torch.int64)
        if exclude is not None:
            rows, cols = _chunk_pairs(exclude, u)
            not_below = (~below[rows, cols]).to(torch.int64)
            rank = rank - torch.zeros_like(rank).index_add_(0, rows, not_below)
        out.append(rank.clamp_(min=1))
    return torch.cat(out) if out else torch.empty((0,), dtype=torch.int64, device=users.device)
