"""Row-wise (lazy) Adam: update only the embedding rows a batch touches.

Like torch's SparseAdam: the moments of untouched rows stay as they are and
the bias correction uses the global step. Mathematically the same as Adam on
the touched rows; cheaper by |rows| / |touched| per step.
"""

from __future__ import annotations

import torch


class RowAdam:
    def __init__(self, tables: dict[str, torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.tables = tables
        self.lr, self.b1, self.b2, self.eps = lr, betas[0], betas[1], eps
        self.m = {k: torch.zeros_like(v) for k, v in tables.items()}
        self.v = {k: torch.zeros_like(v) for k, v in tables.items()}
        self.t = 0

    @torch.no_grad()
    def step(self, updates: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``updates[name] = (unique_rows, grad_rows)``; rows must be unique."""
        self.t += 1
        c1 = 1.0 - self.b1**self.t
        c2 = 1.0 - self.b2**self.t
        for name, (rows, g) in updates.items():
            m = self.m[name].index_select(0, rows).mul_(self.b1).add_(g, alpha=1 - self.b1)
            v = self.v[name].index_select(0, rows).mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            self.m[name].index_copy_(0, rows, m)
            self.v[name].index_copy_(0, rows, v)
            step = (m / c1).div_((v / c2).sqrt_().add_(self.eps)).mul_(-self.lr)
            self.tables[name].index_add_(0, rows, step)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"opt.m.{k}": v for k, v in self.m.items()}
        out.update({f"opt.v.{k}": v for k, v in self.v.items()})
        out["opt.step"] = torch.tensor([self.t], dtype=torch.int64)
        return out

    def load_state_tensors(self, t: dict[str, torch.Tensor]) -> None:
        for k in self.m:
            self.m[k].copy_(t[f"opt.m.{k}"])
            self.v[k].copy_(t[f"opt.v.{k}"])
        self.t = int(t["opt.step"][0])


def torch_optimizer_tensors(opt: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    """Flatten a torch Adam's state into named tensors (for safetensors)."""
    out = {}
    params = opt.param_groups[0]["params"]
    for name, p in zip(names, params):
        st = opt.state.get(p)
        if not st:
            continue
        for key, val in st.items():
            out[f"opt.{key}.{name}"] = val if torch.is_tensor(val) else torch.tensor(val)
    return out


def load_torch_optimizer_tensors(opt: torch.optim.Optimizer, names: list[str], t: dict[str, torch.Tensor]) -> None:
    params = opt.param_groups[0]["params"]
    for name, p in zip(names, params):
        keys = [k for k in t if k.startswith("opt.") and k.endswith(f".{name}")]
        if not keys:
            continue
        st = {}
        for k in keys:
            field = k[len("opt.") : -len(f".{name}")]
            val = t[k]
            st[field] = val.to(p.device) if field != "step" else val.clone()
        opt.state[p] = st


class BPRRowAdam:
    """BPR-MF step with analytic gradients and Adam on the touched rows only.

    Users and items live in one table ``emb`` (users first), and both Adam
    moments of a row sit side by side in ``mv`` (rows x 2m), so a step needs
    one ``unique``, one gradient scatter, one moment gather and write-back,
    and one update for both tables. The maths equals autograd on
    ``bpr_objective`` followed by :class:`RowAdam` (tested); it is just fewer,
    larger tensor operations (random row access is the cost on a CPU).
    """

    def __init__(self, emb: torch.Tensor, n_users: int, lr: float, reg: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.emb, self.n_users = emb, n_users
        self.lr, self.reg, self.b1, self.b2, self.eps = lr, reg, betas[0], betas[1], eps
        self.mv = torch.zeros(emb.shape[0], 2 * emb.shape[1], dtype=emb.dtype, device=emb.device)
        self.t = 0

    @torch.no_grad()
    def step(self, u: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """One step on a batch of (user, positive, negative) rows; returns the batch loss."""
        b, dim = u.shape[0], self.emb.shape[1]
        rows = torch.cat([u, i + self.n_users, j + self.n_users])
        x = self.emb.index_select(0, rows)
        eu, ei, ej = x[:b], x[b : 2 * b], x[2 * b :]
        diff = ei - ej
        s = (eu * diff).sum(1)
        # d/ds mean softplus(-s) = -sigmoid(-s)/B ; the L2 term adds 2λ·row/B to every used row
        coef = (-torch.sigmoid(-s) / b).unsqueeze(1)
        g = torch.cat([coef * diff, coef * eu, -coef * eu])
        if self.reg:
            g.add_(x, alpha=2.0 * self.reg / b)
        uniq, inv = torch.unique(rows, return_inverse=True)
        grad = torch.zeros(uniq.shape[0], dim, dtype=x.dtype, device=x.device).index_add_(0, inv, g)
        self.t += 1
        c1 = 1.0 - self.b1**self.t
        c2 = 1.0 - self.b2**self.t
        mv = self.mv.index_select(0, uniq)
        m, v = mv[:, :dim], mv[:, dim:]
        m.mul_(self.b1).add_(grad, alpha=1 - self.b1)
        v.mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        self.mv.index_copy_(0, uniq, mv)
        upd = (v / c2).sqrt_().add_(self.eps).reciprocal_().mul_(m).mul_(-self.lr / c1)
        self.emb.index_add_(0, uniq, upd)
        loss = torch.nn.functional.softplus(-s).mean()
        if self.reg:
            loss = loss + self.reg * torch.dot(x.view(-1), x.view(-1)) / b
        return loss

    def state_tensors(self) -> dict[str, torch.Tensor]:
        dim = self.emb.shape[1]
        return {"opt.m": self.mv[:, :dim], "opt.v": self.mv[:, dim:], "opt.step": torch.tensor([self.t], dtype=torch.int64)}

    def load_state_tensors(self, t: dict[str, torch.Tensor]) -> None:
        dim = self.emb.shape[1]
        self.mv[:, :dim].copy_(t["opt.m"])
        self.mv[:, dim:].copy_(t["opt.v"])
        self.t = int(t["opt.step"][0])
