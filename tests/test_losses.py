"""Tests for uclr_cli.losses: exact values, autograd cross-checks of the FCCO estimator, numerics, τ dynamics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from uclr_cli.config import ContrastLossConfig
from uclr_cli.losses import (
    bpr_loss,
    contrastive_objective,
    cosine_matrix,
    differences,
    log_g,
    reconstruction_loss,
    temperature_step,
    user_aware_contrastive,
)
from uclr_cli.models.autoencoder import AutoEncoder
from uclr_cli.stages.contrast import TemperatureState, combined_loss

torch.set_num_threads(1)
D64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _first(b: int, dtype=D64) -> torch.Tensor:
    return torch.full((b,), -math.inf, dtype=dtype)


def _h_from(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    return differences(cosine_matrix(z1, z2))


# ---------------------------------------------------------------- BPR / reconstruction


def test_bpr_matches_definition():
    """bpr_loss == -log σ(pos - neg), averaged."""
    g = _gen(0)
    pos, neg = torch.randn(17, generator=g, dtype=D64), torch.randn(17, generator=g, dtype=D64)
    ref = -torch.log(torch.sigmoid(pos - neg)).mean()
    torch.testing.assert_close(bpr_loss(pos, neg), ref, rtol=1e-12, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=1, max_size=8), st.lists(st.floats(-30, 30), min_size=1, max_size=8))
def test_bpr_property(p, n):
    """Matches the definition on arbitrary moderate inputs (broadcast over min length)."""
    k = min(len(p), len(n))
    pos, neg = torch.tensor(p[:k], dtype=D64), torch.tensor(n[:k], dtype=D64)
    ref = -torch.log(torch.sigmoid(pos - neg)).mean()
    torch.testing.assert_close(bpr_loss(pos, neg), ref, rtol=1e-9, atol=1e-12)


def test_bpr_huge_differences_finite():
    """±1e4 differences: loss ≈ 0 resp. ≈ 1e4, never inf/nan, gradient finite."""
    pos = torch.tensor([1e4, -1e4], requires_grad=True)
    neg = torch.zeros(2)
    loss = bpr_loss(pos, neg)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, torch.tensor(0.5e4))  # (0 + 1e4) / 2
    loss.backward()
    assert torch.isfinite(pos.grad).all()
    torch.testing.assert_close(pos.grad, torch.tensor([0.0, -0.5]))
    # the naive formula is not finite there
    assert not torch.isfinite(-torch.log(torch.sigmoid(pos.detach() - neg))).all()


def test_reconstruction_hand_example():
    """Mean over rows of squared L2 error: rows err (1,2) and (0,-3) -> (5 + 9)/2 = 7."""
    recon = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
    target = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert reconstruction_loss(recon, target).item() == 7.0


# ---------------------------------------------------------------- cosine / differences


def test_cosine_and_differences_hand_example():
    """B=3 hand example, including a zero row in b (0 similarity, not NaN)."""
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], dtype=D64)
    b = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=D64)
    s = 1 / math.sqrt(2)
    sim_ref = torch.tensor(
        [
            [1.0, 0.0, s],
            [0.0, 0.0, s],
            [0.6, 0.0, 0.7 * math.sqrt(2)],
        ],
        dtype=D64,
    )
    sim = cosine_matrix(a, b)
    assert not torch.isnan(sim).any()
    torch.testing.assert_close(sim, sim_ref, rtol=1e-12, atol=1e-12)
    h_ref = torch.tensor(
        [
            [0.0 - 1.0, s - 1.0],  # row 0: k=1,2 minus sim[0,0]=1
            [0.0 - 0.0, s - 0.0],  # row 1: k=0,2 minus sim[1,1]=0
            [0.6 - 0.7 * math.sqrt(2), 0.0 - 0.7 * math.sqrt(2)],  # row 2: k=0,1
        ],
        dtype=D64,
    )
    torch.testing.assert_close(differences(sim), h_ref, rtol=1e-12, atol=1e-12)


def test_cosine_zero_rows_both_sides_and_grad():
    """All-zero inputs: similarity 0 everywhere and finite gradients."""
    a = torch.zeros(3, 4, requires_grad=True)
    b = torch.zeros(3, 4, requires_grad=True)
    sim = cosine_matrix(a, b)
    assert torch.equal(sim, torch.zeros(3, 3))
    sim.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_differences_order_matches_loop():
    """h[i] lists sim[i,k]-sim[i,i] for k != i in increasing k."""
    sim = torch.arange(25, dtype=D64).view(5, 5) ** 1.5
    h = differences(sim)
    ref = torch.tensor([[sim[i, k] - sim[i, i] for k in range(5) if k != i] for i in range(5)], dtype=D64)
    assert torch.equal(h, ref)


@pytest.mark.parametrize("b", [1, 2, 3, 8])
def test_differences_gradient_is_the_weights_off_the_diagonal(b):
    """d/dsim of sum(W * h): W at (i, k != i), minus the row sum of W on the diagonal (h = sim - sim_ii)."""
    sim = torch.randn(b, b, dtype=D64, generator=torch.Generator().manual_seed(b)).requires_grad_(True)
    w = torch.arange(1, b * (b - 1) + 1, dtype=D64).view(b, b - 1)
    (differences(sim) * w).sum().backward()
    ref = torch.zeros(b, b, dtype=D64)
    for i in range(b):
        ref[i, [k for k in range(b) if k != i]] = w[i]
        ref[i, i] = -w[i].sum()
    assert torch.equal(sim.grad, ref)


# ---------------------------------------------------------------- FCCO estimator (gamma = 1)


def _latents(seed: int, b: int = 5, d: int = 4, dtype=D64):
    g = _gen(seed)
    z1 = torch.randn(b, d, generator=g, dtype=dtype).requires_grad_()
    z2 = torch.randn(b, d, generator=g, dtype=dtype).requires_grad_()
    return z1, z2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surrogate_gradient_equals_true_gradient_gamma1(seed):
    """With u = g: ∇surrogate = ∇ mean_i τ_i log g_i (τ fixed), w.r.t. z1 and z2."""
    z1, z2 = _latents(seed)
    tau = torch.tensor([0.05, 0.1, 0.3, 0.7, 1.0], dtype=D64)
    step = user_aware_contrastive(_h_from(z1, z2), tau, _first(5), gamma=1.0, rho=0.3)
    got = torch.autograd.grad(step.surrogate, (z1, z2))
    true = (tau * log_g(_h_from(z1, z2), tau)).mean()
    ref = torch.autograd.grad(true, (z1, z2))
    for g_, r_ in zip(got, ref):
        assert r_.abs().max() > 1e-3  # non-trivial gradient
        torch.testing.assert_close(g_, r_, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(step.value, true.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 3])
def test_grad_tau_equals_autograd_and_fd_gamma1(seed):
    """grad_tau == ∂/∂τ_i [τ_i log g_i + ρ τ_i] by autograd and by central differences."""
    z1, z2 = _latents(seed)
    h = _h_from(z1, z2).detach()
    rho = 0.3
    tau = torch.tensor([0.05, 0.1, 0.3, 0.7, 1.0], dtype=D64, requires_grad=True)
    step = user_aware_contrastive(h, tau, _first(5), gamma=1.0, rho=rho)
    (auto,) = torch.autograd.grad(contrastive_objective(h, tau, rho).sum(), tau)
    torch.testing.assert_close(step.grad_tau, auto, rtol=1e-10, atol=1e-12)
    eps = 1e-6
    t = tau.detach()
    fd = torch.stack(
        [
            (contrastive_objective(h, t + eps * e, rho)[i] - contrastive_objective(h, t - eps * e, rho)[i]) / (2 * eps)
            for i, e in enumerate(torch.eye(5, dtype=D64))
        ]
    )
    torch.testing.assert_close(step.grad_tau, fd, rtol=1e-6, atol=1e-7)
    # log u == log g exactly when gamma = 1
    torch.testing.assert_close(step.log_u, log_g(h, t), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- moving average (gamma < 1)


@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.9])
def test_log_u_moving_average(gamma):
    """log u = log((1-γ) u_prev + γ g), computed directly in float64."""
    z1, z2 = _latents(4, b=6)
    h = _h_from(z1, z2).detach()
    tau = torch.tensor([0.1, 0.2, 0.3, 0.5, 0.8, 1.0], dtype=D64)
    log_u_prev = torch.tensor([-1.0, 0.0, 0.5, -0.3, 0.2, 1.0], dtype=D64)
    step = user_aware_contrastive(h, tau, log_u_prev, gamma=gamma, rho=0.3)
    g = torch.exp(h / tau[:, None]).mean(dim=1)
    u = (1 - gamma) * torch.exp(log_u_prev) + gamma * g
    torch.testing.assert_close(step.log_u, torch.log(u), rtol=1e-12, atol=1e-12)
    # the estimators use u in place of g
    w = torch.exp(h / tau[:, None]) / u[:, None]
    gt_ref = torch.log(u) + 0.3 - ((h / tau[:, None]) * w).mean(dim=1)
    torch.testing.assert_close(step.grad_tau, gt_ref, rtol=1e-10, atol=1e-12)
    hl = h.clone().requires_grad_()
    s = user_aware_contrastive(hl, tau, log_u_prev, gamma=gamma, rho=0.3).surrogate
    (gh,) = torch.autograd.grad(s, hl)
    torch.testing.assert_close(gh, w / (h.shape[0] * h.shape[1]), rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- extreme numerics


def _spread_latents(b: int = 8, dtype=torch.float32):
    """2-d latents at spread-out angles so cosine similarities span about [-1, 1]."""
    th1 = torch.linspace(0, 2 * math.pi, b + 1, dtype=D64)[:-1]
    th2 = th1.roll(b // 2) + 0.3 * torch.arange(b, dtype=D64)
    z1 = torch.stack([th1.cos(), th1.sin()], 1).to(dtype).requires_grad_()
    z2 = torch.stack([th2.cos(), th2.sin()], 1).to(dtype).requires_grad_()
    return z1, z2


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_extreme_tau_is_finite_float32(gamma):
    """τ = 1e-5, h over ~[-2, 2], float32: everything finite; the naive exp(h/τ) overflows."""
    z1, z2 = _spread_latents()
    h = _h_from(z1, z2)
    assert h.max() > 0.5 and h.min() < -0.5
    tau = torch.full((8,), 1e-5)
    log_u_prev = torch.linspace(-50, 50, 8) if gamma < 1 else _first(8, torch.float32)
    step = user_aware_contrastive(h, tau, log_u_prev, gamma=gamma, rho=0.3)
    for t in (step.surrogate, step.value, step.log_u, step.grad_tau):
        assert torch.isfinite(t).all(), t
    step.surrogate.backward()
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    assert z1.grad.abs().sum() > 0
    # why log space: the naive inner mean overflows float32
    naive = torch.exp(h.detach() / tau[:, None])
    assert torch.isinf(naive).any()
    assert not torch.isfinite(tau * torch.log(naive.mean(dim=1))).all()


# ---------------------------------------------------------------- τ dynamics


def _run_tau(h: torch.Tensor, rho: float, steps: int, lr: float = 0.05, tau0: float = 0.5):
    b = h.shape[0]
    tau = torch.full((b,), tau0, dtype=h.dtype)
    m = torch.zeros(b, dtype=h.dtype)
    for _ in range(steps):
        s = user_aware_contrastive(h, tau, _first(b, h.dtype), gamma=1.0, rho=rho)
        tau, m = temperature_step(tau, m, s.grad_tau, lr=lr, beta=0.9, clip=3.0, tau_min=1e-5, tau_max=1.0)
    return tau, s.grad_tau


@pytest.fixture(scope="module")
def toy_h() -> torch.Tensor:
    b = 64
    return torch.rand(b, b - 1, generator=_gen(0), dtype=D64) - 0.5


def test_interior_optimum_with_rho(toy_h):
    """ρ=0.3, mean over negatives: τ converges inside the bounds, to the grid minimiser of F_i."""
    b = toy_h.shape[0]
    tau, gt = _run_tau(toy_h, 0.3, 1000)
    assert (tau > 1e-3).all() and (tau < 0.9).all()
    assert gt.abs().max() < 1e-6  # stationary
    grid = torch.linspace(1e-3, 1.0, 5000, dtype=D64)
    F = torch.stack([contrastive_objective(toy_h, torch.full((b,), float(t), dtype=D64), 0.3) for t in grid], 1)
    tau_star = grid[F.argmin(dim=1)]
    assert (tau - tau_star).abs().max() < 1e-3
    assert tau.std() > 1e-2  # users genuinely get different temperatures


def test_no_rho_sends_tau_to_max(toy_h):
    """ρ=0: ∂F/∂τ = -KL(p‖uniform) ≤ 0, so every τ reaches τ_max."""
    tau, _ = _run_tau(toy_h, 0.0, 1000)
    assert torch.equal(tau, torch.ones_like(tau))


def test_sum_over_negatives_sends_tau_to_min(toy_h):
    """Sum instead of mean == ρ + log(B-1): every τ reaches τ_min."""
    b = toy_h.shape[0]
    t = torch.linspace(0.01, 1, b, dtype=D64)
    sum_obj = t * torch.logsumexp(toy_h / t[:, None], dim=1) + 0.3 * t
    torch.testing.assert_close(contrastive_objective(toy_h, t, 0.3 + math.log(b - 1)), sum_obj)
    tau, _ = _run_tau(toy_h, 0.3 + math.log(b - 1), 1000)
    torch.testing.assert_close(tau, torch.full_like(tau, 1e-5), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- individual vs global


def test_individual_equals_global_when_taus_equal():
    """Same τ for everyone: identical loss/step; global τ moves by the mean per-user gradient."""
    cfg_i = ContrastLossConfig(temperature="individual", tau_init=0.2, tau_lr=0.05, mask="element")
    cfg_g = ContrastLossConfig(temperature="global", tau_init=0.2, tau_lr=0.05, mask="element")
    n, users = 12, torch.tensor([0, 3, 5, 7, 8, 11])
    ti = TemperatureState(n, cfg_i, torch.device("cpu"))
    tg = TemperatureState(n, cfg_g, torch.device("cpu"))
    torch.manual_seed(0)
    ae = AutoEncoder(6, [5, 3])
    x = torch.randn(len(users), 6, generator=_gen(1))
    obj_i, val_i, st_i = combined_loss(ae, x, users, ti, cfg_i, _gen(7), first_epoch=True)
    obj_g, val_g, st_g = combined_loss(ae, x, users, tg, cfg_g, _gen(7), first_epoch=True)
    assert torch.equal(obj_i, obj_g) and torch.equal(val_i, val_g)
    for f in ("surrogate", "value", "log_u", "grad_tau"):
        assert torch.equal(getattr(st_i, f), getattr(st_g, f)), f
    assert st_i.grad_tau.std() > 0  # per-user gradients really differ

    ti.update(users, st_i.log_u, st_i.grad_tau)
    tg.update(users, st_g.log_u, st_g.grad_tau)
    kw = dict(lr=0.05, beta=cfg_g.tau_beta, clip=cfg_g.tau_grad_clip, tau_min=cfg_g.tau_min, tau_max=cfg_g.tau_max)
    exp_g, exp_gm = temperature_step(torch.tensor([0.2]), torch.zeros(1), st_g.grad_tau.mean().reshape(1), **kw)
    assert tg.tau.shape == (1,)
    torch.testing.assert_close(tg.tau, exp_g)
    torch.testing.assert_close(tg.tau_m, exp_gm)
    exp_i, _ = temperature_step(torch.full((6,), 0.2), torch.zeros(6), st_i.grad_tau, **kw)
    torch.testing.assert_close(ti.tau[users], exp_i)
    others = torch.ones(n, dtype=torch.bool)
    others[users] = False
    assert torch.equal(ti.tau[others], torch.full((n - 6,), 0.2))
    assert torch.equal(ti.log_u[users], st_i.log_u) and torch.equal(tg.log_u[users], st_g.log_u)
    assert torch.isinf(ti.log_u[others]).all()


def test_global_tau_gradient_is_mean_of_per_user():
    """d/dt mean_i F_i(t) for a shared t == mean_i grad_tau_i (gamma=1)."""
    z1, z2 = _latents(5, b=6)
    h = _h_from(z1, z2).detach()
    t = torch.tensor(0.15, dtype=D64, requires_grad=True)
    (dt,) = torch.autograd.grad(contrastive_objective(h, t.expand(6), 0.3).mean(), t)
    step = user_aware_contrastive(h, t.detach().expand(6), _first(6), gamma=1.0, rho=0.3)
    torch.testing.assert_close(step.grad_tau.mean(), dt, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- temperature_step


def test_temperature_step_hand_example():
    """Clip to ±3, momentum (1-β)m + βg, τ - lr·m, projection to [0.05, 0.7]."""
    tau = torch.tensor([0.5, 0.5, 0.5], dtype=D64)
    m = torch.tensor([0.1, -0.2, 0.0], dtype=D64)
    grad = torch.tensor([5.0, -0.5, -10.0], dtype=D64)
    new_tau, new_m = temperature_step(tau, m, grad, lr=0.1, beta=0.9, clip=3.0, tau_min=0.05, tau_max=0.7)
    # clipped g = [3, -0.5, -3]; m = 0.1*m + 0.9*g = [2.71, -0.47, -2.7]
    torch.testing.assert_close(new_m, torch.tensor([2.71, -0.47, -2.7], dtype=D64), rtol=0, atol=1e-14)
    # τ = 0.5 - 0.1*m = [0.229, 0.547, 0.77 -> 0.7]
    torch.testing.assert_close(new_tau, torch.tensor([0.229, 0.547, 0.7], dtype=D64), rtol=0, atol=1e-14)
    # the inputs are not modified in place
    assert torch.equal(tau, torch.full((3,), 0.5, dtype=D64)) and torch.equal(
        m, torch.tensor([0.1, -0.2, 0.0], dtype=D64)
    )


def test_temperature_step_lower_bound_and_clip_symmetric():
    """A huge positive gradient is clipped to +3 and τ projected up to τ_min."""
    tau = torch.tensor([0.06, 0.3, 1e-5], dtype=D64)
    m = torch.zeros(3, dtype=D64)
    grad = torch.tensor([1e9, 3.0, math.inf], dtype=D64)
    new_tau, new_m = temperature_step(tau, m, grad, lr=1.0, beta=1.0, clip=3.0, tau_min=0.05, tau_max=0.7)
    assert torch.equal(new_m, torch.full((3,), 3.0, dtype=D64))
    assert torch.equal(new_tau, torch.full((3,), 0.05, dtype=D64))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=3),
    st.lists(st.floats(-5, 5), min_size=3, max_size=3),
    st.floats(0.01, 1.0),
)
def test_temperature_step_property(grad, mom, beta):
    """τ always in bounds; momentum exactly (1-β)m + β·clip(g)."""
    tau = torch.tensor([1e-5, 0.3, 1.0], dtype=D64)
    m = torch.tensor(mom, dtype=D64)
    g = torch.tensor(grad, dtype=D64)
    t2, m2 = temperature_step(tau, m, g, lr=0.05, beta=beta, clip=3.0, tau_min=1e-5, tau_max=1.0)
    assert ((t2 >= 1e-5) & (t2 <= 1.0)).all()
    torch.testing.assert_close(m2, (1 - beta) * m + beta * g.clamp(-3, 3), rtol=1e-12, atol=1e-12)
