"""The fused BPR row-wise Adam step equals autograd on the BPR objective + row-wise Adam."""

from __future__ import annotations

import pytest
import torch

from uclr_cli.optim import BPRRowStep, RowAdam
from uclr_cli.stages.pretrain import bpr_objective


def fused_adam(emb, n_users, lr, reg, betas, **kw):
    """The fused step of the Adam family: lazy Adam, or exactly dense Adam when beta1 = 0."""
    return BPRRowStep(emb, n_users, lr=lr, reg=reg, kind="adam" if betas[0] else "rmsprop", betas=betas, **kw)


def test_fused_step_matches_autograd_reference():
    """rowwise-adam; rowwise-rmsprop is checked against dense Adam below."""
    b1 = 0.9
    g = torch.Generator().manual_seed(0)
    n_users, n_items, m = 7, 11, 5
    users = torch.randn(n_users, m, generator=g, dtype=torch.float64)
    items = torch.randn(n_items, m, generator=g, dtype=torch.float64)
    emb = torch.cat([users, items]).clone()
    fused = fused_adam(emb, n_users, lr=0.01, reg=0.1, betas=(b1, 0.999))
    ref_u, ref_i = users.clone(), items.clone()
    ref = RowAdam({"u": ref_u, "i": ref_i}, lr=0.01, betas=(b1, 0.999))
    for _ in range(6):
        u = torch.randint(0, n_users, (9,), generator=g)  # repeats on purpose
        i = torch.randint(0, n_items, (9,), generator=g)
        j = torch.randint(0, n_items, (9,), generator=g)
        loss = fused.step(u, i, j)
        uu, inv_u = torch.unique(u, return_inverse=True)
        ii, inv_i = torch.unique(torch.cat([i, j]), return_inverse=True)
        eu = ref_u[uu].clone().requires_grad_(True)
        ei = ref_i[ii].clone().requires_grad_(True)
        ref_loss = bpr_objective(eu[inv_u], ei[inv_i[:9]], ei[inv_i[9:]], 0.1)
        gu, gi = torch.autograd.grad(ref_loss, [eu, ei])
        ref.step({"u": (uu, gu), "i": (ii, gi)})
        assert torch.allclose(loss, ref_loss.detach())
    assert torch.allclose(emb[:n_users], ref_u, atol=1e-12)
    assert torch.allclose(emb[n_users:], ref_i, atol=1e-12)


@pytest.mark.parametrize("b1", [0.9, 0.0])
def test_untouched_rows_unchanged_and_state_round_trip(b1):
    emb = torch.randn(10, 4, dtype=torch.float64)
    before = emb.clone()
    opt = fused_adam(emb, 4, lr=0.1, reg=0.0, betas=(b1, 0.999))
    opt.step(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([2, 2]))
    touched = {0, 1, 4, 5, 6}
    for r in range(10):
        assert torch.equal(emb[r], before[r]) == (r not in touched)
    other = fused_adam(emb.clone(), 4, lr=0.1, reg=0.0, betas=(b1, 0.999))
    assert ("opt.m" in opt.state_tensors()) == bool(b1)  # no first moment is kept without momentum
    other.load_state_tensors(opt.state_tensors())
    a = opt.step(torch.tensor([2]), torch.tensor([3]), torch.tensor([0]))
    b = other.step(torch.tensor([2]), torch.tensor([3]), torch.tensor([0]))
    assert torch.equal(a, b) and torch.equal(opt.emb, other.emb)


def test_without_momentum_a_touched_row_moves_by_lr_times_g_over_root_v():
    """beta1 = 0: the first step moves each touched row by -lr * g / (|g| + eps) per coordinate (v = g²)."""
    emb = torch.tensor([[1.0, -2.0], [0.5, 0.25], [-1.0, 1.0]], dtype=torch.float64)  # 1 user, 2 items
    before = emb.clone()
    opt = fused_adam(emb, 1, lr=0.1, reg=0.0, betas=(0.0, 0.999), eps=0.0)
    opt.step(torch.tensor([0]), torch.tensor([0]), torch.tensor([1]))
    eu, ei, ej = before
    coef = -torch.sigmoid(-(eu * (ei - ej)).sum())
    grads = torch.stack([coef * (ei - ej), coef * eu, -coef * eu])
    torch.testing.assert_close(emb, before - 0.1 * torch.sign(grads), rtol=1e-12, atol=1e-12)


def test_without_momentum_equals_dense_adam_beta1_zero():
    """rowwise-rmsprop is dense torch Adam(betas=(0, b2)) on the BPR objective, computed on the touched rows only.

    Rows a batch does not touch have a zero gradient: dense Adam leaves them in place but decays their v;
    the row-wise step applies that decay when the row comes back. Some rows stay idle for several steps here.
    """
    g = torch.Generator().manual_seed(3)
    n_users, n_items, m, b = 6, 13, 4, 5
    users = torch.randn(n_users, m, generator=g, dtype=torch.float64)
    items = torch.randn(n_items, m, generator=g, dtype=torch.float64)
    emb = torch.cat([users, items]).clone()
    fused = fused_adam(emb, n_users, lr=0.05, reg=0.1, betas=(0.0, 0.9))  # small b2: the decay matters
    ref_u, ref_i = users.clone().requires_grad_(True), items.clone().requires_grad_(True)
    dense = torch.optim.Adam([ref_u, ref_i], lr=0.05, betas=(0.0, 0.9))
    for step in range(12):
        u = torch.randint(0, n_users, (b,), generator=g)
        i = torch.randint(0, n_items // 2 if step % 3 else n_items, (b,), generator=g)  # high items idle for a while
        j = torch.randint(0, n_items, (b,), generator=g)
        loss = fused.step(u, i, j)
        dense.zero_grad()
        ref_loss = bpr_objective(ref_u[u], ref_i[i], ref_i[j], 0.1)
        ref_loss.backward()
        dense.step()
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(emb, torch.cat([ref_u, ref_i]).detach(), rtol=0, atol=1e-12)
    v_dense = torch.cat([dense.state[ref_u]["exp_avg_sq"], dense.state[ref_i]["exp_avg_sq"]])
    idle = fused.t - fused.last  # v not yet caught up: dense v = b2**idle * ours
    torch.testing.assert_close(fused.state * 0.9 ** idle.unsqueeze(1).double(), v_dense, rtol=1e-10, atol=1e-14)
