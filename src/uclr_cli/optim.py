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
    """A torch optimizer's state as named tensors ``opt.<field>.<param name>`` (the one checkpoint layout)."""
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
    """Restore :func:`torch_optimizer_tensors`' output. Also reads the layout of resume states written by
    ``uclr contrast`` before 0.2 (``opt.<param index>.<field>``), so such runs still resume."""
    params = opt.param_groups[0]["params"]
    legacy: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in t.items():
        parts = k.split(".", 2)
        if len(parts) == 3 and parts[0] == "opt" and parts[1].isdigit():
            legacy.setdefault(int(parts[1]), {})[parts[2]] = v
    for i, (name, p) in enumerate(zip(names, params)):
        st = {
            k[len("opt.") : -len(f".{name}")]: v
            for k, v in t.items()
            if k.startswith("opt.") and k.endswith(f".{name}") and not k.split(".")[1].isdigit()
        } or legacy.get(i, {})
        if st:
            opt.state[p] = {f: v.clone() if f == "step" else v.to(p.device) for f, v in st.items()}


class BPRRowAdam:
    """BPR-MF step with analytic gradients and Adam on the touched rows only.

    Users and items live in one table ``emb`` (users first), and the Adam
    moments of a row sit side by side in ``state`` (rows x 2m: m then v), so a
    step needs one ``unique``, one gradient scatter, one moment gather and one
    update of each table. The maths equals autograd on ``bpr_objective``
    followed by :class:`RowAdam` (tested); it is just fewer, larger tensor
    operations (random row access is the cost on a CPU). Both tables are
    written back with ``index_add_`` of the change (on the CPU it is ~2x
    faster than ``index_copy_``).

    With ``betas[0] == 0`` the step is *exactly* dense Adam with β1 = 0,
    computed lazily: there is no first moment, so a row with no gradient does
    not move, and its v only decays by β2 per step — which is applied when the
    row is next touched (``last`` holds each row's last step). ``state`` is
    then v only (rows x m): a third less memory traffic than lazy Adam.
    """

    def __init__(self, emb: torch.Tensor, n_users: int, lr: float, reg: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.emb, self.n_users = emb, n_users
        self.lr, self.reg, self.b1, self.b2, self.eps = lr, reg, betas[0], betas[1], eps
        width = (2 if self.b1 else 1) * emb.shape[1]
        self.state = torch.zeros(emb.shape[0], width, dtype=emb.dtype, device=emb.device)
        if self.b1:  # per column: (1 - b1) for m, (1 - b2) for v
            self.keep = torch.cat(
                [emb.new_full((emb.shape[1],), 1 - self.b1), emb.new_full((emb.shape[1],), 1 - self.b2)]
            )
        else:
            self.last = torch.zeros(emb.shape[0], dtype=torch.int64, device=emb.device)
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
        coef = torch.sigmoid(-s).mul_(-1.0 / b).unsqueeze(1)
        g = torch.empty_like(x)
        torch.mul(diff, coef, out=g[:b])
        torch.mul(eu, coef, out=g[b : 2 * b])
        torch.neg(g[b : 2 * b], out=g[2 * b :])
        if self.reg:
            g.add_(x, alpha=2.0 * self.reg / b)
        uniq, inv = torch.unique(rows, return_inverse=True)
        grad = torch.zeros(uniq.shape[0], dim, dtype=x.dtype, device=x.device).index_add_(0, inv, g)
        self.t += 1
        c1 = 1.0 - self.b1**self.t
        c2 = 1.0 - self.b2**self.t
        st = self.state.index_select(0, uniq)
        if self.b1:  # delta = ([g, g²] - [m, v]) * [1-b1, 1-b2]
            delta = torch.cat([grad, grad * grad], 1).sub_(st).mul_(self.keep)
            m, v = st[:, :dim], st[:, dim:]
        else:  # v of a row idle for n steps decayed by b2**n in dense Adam: v' = b2**(n+1)·v + (1-b2)·g²
            idle = (self.t - 1) - self.last.index_select(0, uniq)
            self.last.index_fill_(0, uniq, self.t)
            decay = torch.pow(self.b2, idle.to(x.dtype)).mul_(self.b2).sub_(1.0).unsqueeze(1)
            delta = (grad * grad).mul_(1 - self.b2).addcmul_(st, decay)
            m, v = grad, st
        st.add_(delta)  # the new moments; the same additions as the write-back below
        self.state.index_add_(0, uniq, delta)
        den = v.sqrt().mul_(c2**-0.5).add_(self.eps)
        self.emb.index_add_(0, uniq, m.div(den), alpha=-self.lr / c1)
        loss = torch.nn.functional.softplus(-s).mean()
        if self.reg:
            loss = loss + self.reg * torch.dot(x.view(-1), x.view(-1)) / b
        return loss

    def state_tensors(self) -> dict[str, torch.Tensor]:
        dim = self.emb.shape[1]
        out = {"opt.v": self.state[:, -dim:], "opt.step": torch.tensor([self.t], dtype=torch.int64)}
        if self.b1:
            out["opt.m"] = self.state[:, :dim]
        else:
            out["opt.last"] = self.last
        return out

    def load_state_tensors(self, t: dict[str, torch.Tensor]) -> None:
        dim = self.emb.shape[1]
        self.state[:, -dim:].copy_(t["opt.v"])
        if self.b1:
            self.state[:, :dim].copy_(t["opt.m"])
        else:
            self.last.copy_(t["opt.last"])
        self.t = int(t["opt.step"][0])
