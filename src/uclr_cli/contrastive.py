"""The user-aware contrastive objective on the autoencoder, shared by contrast and finetune (paper §3.4).

:class:`TemperatureState` holds τ (one per user, or one shared), its momentum
and log u per user: model state, checkpointed with the weights.
:func:`combined_loss` is L_con (the FCCO surrogate of :mod:`uclr_cli.losses`)
plus α·L_rec on one batch of users, over both streams.
"""

from __future__ import annotations

import math

import torch

from uclr_cli.config import ContrastLossConfig
from uclr_cli.losses import (
    cosine_matrix,
    differences,
    reconstruction_loss,
    temperature_step,
    user_aware_contrastive,
)
from uclr_cli.models.autoencoder import AutoEncoder, mask_elements, mask_rows


class TemperatureState:
    """τ (per user, or one shared), its momentum, and log u per user: all checkpointed."""

    def __init__(self, n_users: int, loss: ContrastLossConfig, device: torch.device):
        n_tau = n_users if loss.temperature == "individual" else 1
        self.individual = loss.temperature == "individual"
        self.tau = torch.full((n_tau,), loss.tau_init, device=device)
        self.tau_m = torch.zeros(n_tau, device=device)
        self.log_u = torch.full((n_users,), -math.inf, device=device)
        self.cfg = loss

    def batch_tau(self, users: torch.Tensor) -> torch.Tensor:
        return self.tau[users] if self.individual else self.tau.expand(len(users))

    def update(self, users: torch.Tensor, log_u: torch.Tensor, grad_tau: torch.Tensor, train_tau: bool = True) -> None:
        self.log_u[users] = log_u
        if not train_tau:
            return
        c = self.cfg
        kw = dict(lr=c.tau_lr, beta=c.tau_beta, clip=c.tau_grad_clip, tau_min=c.tau_min, tau_max=c.tau_max)
        if self.individual:
            self.tau[users], self.tau_m[users] = temperature_step(self.tau[users], self.tau_m[users], grad_tau, **kw)
        else:
            self.tau, self.tau_m = temperature_step(self.tau, self.tau_m, grad_tau.mean().reshape(1), **kw)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"tau": self.tau, "tau_momentum": self.tau_m, "log_u": self.log_u}

    def load(self, t: dict[str, torch.Tensor]) -> None:
        self.tau = t["tau"].to(self.tau.device).clone()
        self.tau_m = t["tau_momentum"].to(self.tau.device).clone()
        self.log_u = t["log_u"].to(self.tau.device).clone()


def masked(x: torch.Tensor, loss: ContrastLossConfig, gen: torch.Generator) -> torch.Tensor:
    if loss.mask == "row":
        return mask_rows(x, loss.mask_ratio, gen)
    return mask_elements(x, loss.mask_ratio, gen)


def combined_loss(
    ae: AutoEncoder,
    x: torch.Tensor,
    users: torch.Tensor,
    temps: TemperatureState,
    loss: ContrastLossConfig,
    gen,
    first_epoch: bool,
    part: tuple[int, int] | None = None,
):
    """L_con (FCCO surrogate) + α·L_rec on a batch; returns (objective, reported value, step).

    ``part`` ``(lo, hi)``: a data-parallel rank's anchors. Its objective and value are their terms only, as
    their share of the batch mean, so the ranks' add up to the batch's (zero for an empty share). The rank
    still encodes the whole batch (its anchors' negatives) and draws the whole batch's mask, so the
    generator advances alike everywhere; ``step`` (u and the τ gradient) is the whole batch's on every rank.
    """
    n = len(x)
    lo, hi = part or (0, n)
    share = (hi - lo) / n
    zero = x.new_zeros(())
    if loss.temperature == "none":  # the plain AE ablation: one stream, reconstruction only
        if hi == lo:
            return zero, zero, None
        rec = reconstruction_loss(ae(x[lo:hi]), x[lo:hi])
        if share != 1:
            rec = rec * share
        return loss.alpha * rec, loss.alpha * rec.detach(), None
    z1 = ae.encode(x)
    z2 = ae.encode(masked(x, loss, gen))
    h = differences(cosine_matrix(z1, z2))
    gamma = 1.0 if first_epoch else loss.gamma
    step = user_aware_contrastive(
        h, temps.batch_tau(users), temps.log_u[users], gamma=gamma, rho=loss.rho, rows=part if hi > lo else None
    )
    if hi == lo:
        return zero, zero, step
    xs = x[lo:hi]
    rec = reconstruction_loss(ae.decode(z1[lo:hi]), xs) + reconstruction_loss(ae.decode(z2[lo:hi]), xs)
    objective, value = step.surrogate + loss.alpha * rec, step.value + loss.alpha * rec.detach()
    if share != 1:
        objective, value = objective * share, value * share
    return objective, value, step
