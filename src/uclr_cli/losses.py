"""Losses: BPR, reconstruction, and the user-aware contrastive loss (paper §3.4, App. A).

The contrastive loss follows iSogCLR (Qiu et al., ICML'23), which the paper
builds on, with the open points fixed as in docs/design.md §3:

* per user i, with h_ik = sim(e_i, e'_k) - sim(e_i, e'_i) over the batch's
  other users k, the objective is  τ_i·log(mean_k exp(h_ik/τ_i)) + ρ·τ_i.
  The *mean* (eq. 9/12), not the sum of eq. 3: the sum shifts ρ by log(B-1)
  and drives every τ to τ_min; without ρ every τ goes to τ_max.
* g_i = mean_k exp(h_ik/τ_i) is tracked by a moving average u_i (FCCO),
  kept as log u_i: with τ = 1e-5, exp(h/τ) overflows float32 once h > ~1e-3.
* τ_i moves by momentum on its exact gradient, clipped, then projected to
  [τ_min, τ_max]; no 1/|U| factor (with it τ never moves).

Everything is a pure function of tensors; the state (τ, log u, momentum) is
passed in and returned, so it can be checkpointed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Mean of -log σ(pos - neg), computed stably as softplus(neg - pos)."""
    return F.softplus(neg - pos).mean()


def l2_term(eu: torch.Tensor, ip: torch.Tensor, ineg: torch.Tensor, reg) -> torch.Tensor | float:
    """L2 on the rows used in a batch: λ·mean over the batch of squared norms.

    ``reg`` is one λ for every role or (user, positive, negative).
    """
    ru, rp, rn = reg if isinstance(reg, tuple | list) else (reg, reg, reg)
    if ru == rp == rn:
        return ru * (eu.pow(2).sum(1) + ip.pow(2).sum(1) + ineg.pow(2).sum(1)).mean() if ru else 0.0
    return (ru * eu.pow(2).sum(1) + rp * ip.pow(2).sum(1) + rn * ineg.pow(2).sum(1)).mean()


def bpr_objective(eu: torch.Tensor, ip: torch.Tensor, ineg: torch.Tensor, reg, free_user_cols=None) -> torch.Tensor:
    """BPR plus L2 on the rows used in the batch (:func:`l2_term`); ``free_user_cols`` limits the
    user rows' L2 to their first columns (an item bias's fixed partner column is not a weight)."""
    loss = bpr_loss((eu * ip).sum(1), (eu * ineg).sum(1))
    return loss + l2_term(eu if free_user_cols is None else eu[:, :free_user_cols], ip, ineg, reg)


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the squared L2 error ‖recon - target‖²."""
    return (recon - target).pow(2).sum(dim=1).mean()


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sim[i, k] = cos(a_i, b_k); zero rows give 0 similarity, not NaN."""
    return F.normalize(a, dim=1, eps=1e-12) @ F.normalize(b, dim=1, eps=1e-12).T


def differences(sim: torch.Tensor) -> torch.Tensor:
    """h[i, k] = sim[i, k] - sim[i, i] for k != i, as a (B, B-1) matrix."""
    b = sim.shape[0]
    h = sim - sim.diagonal().unsqueeze(1)
    # Drop the diagonal with a strided view, not a boolean mask: in the flattened matrix without its
    # first entry the diagonal is every (b+1)-th entry, the last column of a (b-1, b+1) view. Same
    # entries in the same order; forward and backward are plain copies (4x faster at B = 2048 on CPU).
    return h.flatten()[1:].view(b - 1, b + 1)[:, :-1].reshape(b, b - 1)


def log_g(h: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """log mean_k exp(h_ik / τ_i), by logsumexp. ``tau`` is (B,) or a scalar."""
    tau = tau.reshape(-1, 1) if tau.dim() else tau
    return torch.logsumexp(h / tau, dim=1) - math.log(h.shape[1])


def contrastive_objective(h: torch.Tensor, tau: torch.Tensor, rho: float) -> torch.Tensor:
    """Per-user objective τ_i·log g_i + ρ·τ_i (differentiable in h and τ)."""
    return tau * log_g(h, tau) + rho * tau


@dataclass
class ContrastStep:
    """What one batch of the user-aware contrastive loss yields."""

    surrogate: torch.Tensor  # scalar; its gradient w.r.t. the encoder is the FCCO estimate
    value: torch.Tensor  # scalar; mean of τ_i·log g_i (for logging)
    log_u: torch.Tensor  # (B,) updated moving averages (log space)
    grad_tau: torch.Tensor  # (B,) per-user τ gradient estimate (before clipping)


def user_aware_contrastive(
    h: torch.Tensor,
    tau: torch.Tensor,
    log_u_prev: torch.Tensor,
    *,
    gamma: float,
    rho: float,
    rows: tuple[int, int] | None = None,
) -> ContrastStep:
    """One FCCO step of the user-aware contrastive loss on a batch.

    ``h`` (B, B-1) carries the graph to the encoder; ``tau`` (B,) is the batch
    users' temperatures (detached state); ``log_u_prev`` (B,) their moving
    averages (use -inf, or gamma=1, on the first visit). Returns the
    surrogate whose gradient is mean_i mean_k w_ik ∇h_ik with
    w_ik = exp(h_ik/τ_i - log u_i), i.e. τ_i/u_i·∇g_i of eq. 13, and the τ
    gradient  log u_i + ρ - mean_k (h_ik/τ_i)·w_ik.

    ``rows`` ``(lo, hi)``: ``surrogate`` and ``value`` are means over those anchors only (a data-parallel
    rank's share, not empty); ``log_u`` and ``grad_tau`` are always the whole batch's.
    """
    tau = tau.detach().reshape(-1)
    with torch.no_grad():
        z = h.detach() / tau[:, None]
        lg = torch.logsumexp(z, dim=1) - math.log(h.shape[1])
        if gamma >= 1.0:
            log_u = lg
        else:
            log_u = torch.logaddexp(math.log1p(-gamma) + log_u_prev, math.log(gamma) + lg)
        w = torch.exp(z - log_u[:, None])  # bounded by (B-1)/gamma since u >= gamma·g
        grad_tau = log_u + rho - (z * w).mean(dim=1)
    if rows is not None:
        lo, hi = rows
        w, h, tau, lg = (t[lo:hi] for t in (w, h, tau, lg))
    surrogate = (w * h).mean(dim=1).mean()
    value = (tau * lg).mean()
    return ContrastStep(surrogate=surrogate, value=value, log_u=log_u, grad_tau=grad_tau)


def temperature_step(
    tau: torch.Tensor,
    momentum: torch.Tensor,
    grad: torch.Tensor,
    *,
    lr: float,
    beta: float,
    clip: float,
    tau_min: float,
    tau_max: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Momentum step on τ with a clipped gradient, projected to [τ_min, τ_max].

    ``beta`` is the weight of the new gradient in the moving average (the
    paper's β0 in Algorithm 2, step 7).
    """
    g = grad.clamp(-clip, clip)
    momentum = (1.0 - beta) * momentum + beta * g
    tau = (tau - lr * momentum).clamp(tau_min, tau_max)
    return tau, momentum
