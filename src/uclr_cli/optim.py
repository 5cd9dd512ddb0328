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


class BPRRowStep:
    """BPR-MF step with analytic gradients, updating only the rows a batch touches.

    Users and items live in one table ``emb`` (users first), and the optimizer
    state of a row sits side by side in ``state``, so a step needs one
    ``unique``, one gradient scatter, one state gather and one update of each
    table. ``kind``:

    * ``adam``: lazy Adam (moments m then v per row; untouched rows keep theirs);
    * ``rmsprop``: *exactly* dense Adam with β1 = 0, computed lazily: with no
      first moment a row without gradient does not move, and its v only decays
      by β2 per step — applied when the row is next touched (``last`` holds each
      row's last step);
    * ``adagrad``: v accumulates g², step lr·g/(√v + eps);
    * ``sgd``: plain SGD, no state.

    The maths equals autograd on :func:`uclr_cli.losses.bpr_objective`
    followed by the optimizer on the touched rows (tested). L2 is per role
    (``reg = (user, positive, negative)``), λ·squared norm of each row used,
    averaged over the batch. With ``fixed_last_user_col`` the users' last
    column (an item bias's partner, 1) gets no gradient and no L2.
    """

    KINDS = ("adam", "rmsprop", "adagrad", "sgd")

    def __init__(
        self,
        emb: torch.Tensor,
        n_users: int,
        lr: float,
        reg: float | tuple[float, float, float],
        kind: str = "rmsprop",
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        fixed_last_user_col: bool = False,
    ):
        if kind not in self.KINDS:
            raise ValueError(f"unknown row-wise optimizer {kind!r}")
        self.emb, self.n_users, self.kind = emb, n_users, kind
        self.lr, self.eps, self.fixed = lr, eps, fixed_last_user_col
        self.reg = tuple(reg) if isinstance(reg, tuple | list) else (reg, reg, reg)
        self.b1 = betas[0] if kind == "adam" else 0.0
        self.b2 = betas[1]
        width = {"adam": 2, "rmsprop": 1, "adagrad": 1, "sgd": 0}[kind] * emb.shape[1]
        self.state = torch.zeros(emb.shape[0], width, dtype=emb.dtype, device=emb.device)
        if kind == "adam":  # per column: (1 - b1) for m, (1 - b2) for v
            self.keep = torch.cat(
                [emb.new_full((emb.shape[1],), 1 - self.b1), emb.new_full((emb.shape[1],), 1 - self.b2)]
            )
        if kind == "rmsprop":
            self.last = torch.zeros(emb.shape[0], dtype=torch.int64, device=emb.device)
        self.t = 0

    @torch.no_grad()
    def step(self, u: torch.Tensor, i: torch.Tensor, j: torch.Tensor, part=None, reduce=None) -> torch.Tensor:
        """One step on a batch of (user, positive, negative) rows; returns the batch loss.

        Data-parallel (docs/distributed.md): every rank passes the whole global batch, ``part = (lo, hi)``
        its contiguous share and ``reduce`` an in-place sum over the ranks. The rank computes the gradients
        of its share only (divided by the global batch size), ``reduce`` sums them per touched row (the
        rows of the global batch, so the same ``unique`` on every rank, nothing else to exchange), and
        every rank applies the same update; the returned loss is then this share's part of the batch loss.
        """
        b, dim = u.shape[0], self.emb.shape[1]
        rows = torch.cat([u, i + self.n_users, j + self.n_users])
        if part is None:
            lb, local = b, rows
        else:
            lo, hi = part
            lb, local = hi - lo, torch.cat([u[lo:hi], i[lo:hi] + self.n_users, j[lo:hi] + self.n_users])
        x = self.emb.index_select(0, local)
        eu, ei, ej = x[:lb], x[lb : 2 * lb], x[2 * lb :]
        diff = ei - ej
        s = (eu * diff).sum(1)
        # d/ds mean softplus(-s) = -sigmoid(-s)/B ; the L2 term adds 2λ·row/B to every used row
        coef = torch.sigmoid(-s).mul_(-1.0 / b).unsqueeze(1)
        g = torch.empty_like(x)
        torch.mul(diff, coef, out=g[:lb])
        torch.mul(eu, coef, out=g[lb : 2 * lb])
        torch.neg(g[lb : 2 * lb], out=g[2 * lb :])
        ru, rp, rn = self.reg
        if ru == rp == rn:
            if ru:
                g.add_(x, alpha=2.0 * ru / b)
        else:
            for role, r in ((slice(0, lb), ru), (slice(lb, 2 * lb), rp), (slice(2 * lb, 3 * lb), rn)):
                if r:
                    g[role].add_(x[role], alpha=2.0 * r / b)
        if self.fixed:
            g[:lb, -1] = 0.0
        uniq, inv = torch.unique(rows, return_inverse=True)
        if part is not None:  # where this rank's rows sit in the global batch
            inv = torch.cat([inv[lo:hi], inv[b + lo : b + hi], inv[2 * b + lo : 2 * b + hi]])
        grad = torch.zeros(uniq.shape[0], dim, dtype=x.dtype, device=x.device).index_add_(0, inv, g)
        if reduce is not None:
            reduce(grad)
        self.t += 1
        self._update(uniq, grad)
        loss = torch.nn.functional.softplus(-s)
        loss = loss.mean() if part is None else loss.sum() / b
        if any(self.reg):
            free = eu[:, :-1] if self.fixed else eu
            if ru == rp == rn and not self.fixed:
                loss = loss + ru * torch.dot(x.view(-1), x.view(-1)) / b
            else:
                sq = lambda t: torch.dot(t.reshape(-1), t.reshape(-1))  # noqa: E731
                loss = loss + (ru * sq(free) + rp * sq(ei) + rn * sq(ej)) / b
        return loss

    def _update(self, uniq: torch.Tensor, grad: torch.Tensor) -> None:
        dim = self.emb.shape[1]
        if self.kind == "sgd":
            self.emb.index_add_(0, uniq, grad, alpha=-self.lr)
            return
        st = self.state.index_select(0, uniq)
        if self.kind == "adagrad":
            delta = grad * grad
            st.add_(delta)
            self.state.index_add_(0, uniq, delta)
            self.emb.index_add_(0, uniq, grad.div_(st.sqrt_().add_(self.eps)), alpha=-self.lr)
            return
        c1 = 1.0 - self.b1**self.t
        c2 = 1.0 - self.b2**self.t
        if self.kind == "adam":  # delta = ([g, g²] - [m, v]) * [1-b1, 1-b2]
            delta = torch.cat([grad, grad * grad], 1).sub_(st).mul_(self.keep)
            m, v = st[:, :dim], st[:, dim:]
        else:  # v of a row idle for n steps decayed by b2**n in dense Adam: v' = b2**(n+1)·v + (1-b2)·g²
            idle = (self.t - 1) - self.last.index_select(0, uniq)
            self.last.index_fill_(0, uniq, self.t)
            decay = torch.pow(self.b2, idle.to(grad.dtype)).mul_(self.b2).sub_(1.0).unsqueeze(1)
            delta = (grad * grad).mul_(1 - self.b2).addcmul_(st, decay)
            m, v = grad, st
        st.add_(delta)  # the new moments; the same additions as the write-back below
        self.state.index_add_(0, uniq, delta)
        den = v.sqrt().mul_(c2**-0.5).add_(self.eps)
        self.emb.index_add_(0, uniq, m.div(den), alpha=-self.lr / c1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        dim = self.emb.shape[1]
        out = {"opt.step": torch.tensor([self.t], dtype=torch.int64)}
        if self.kind != "sgd":
            out["opt.v"] = self.state[:, -dim:]
        if self.kind == "adam":
            out["opt.m"] = self.state[:, :dim]
        if self.kind == "rmsprop":
            out["opt.last"] = self.last
        return out

    def load_state_tensors(self, t: dict[str, torch.Tensor]) -> None:
        dim = self.emb.shape[1]
        if self.kind != "sgd":
            self.state[:, -dim:].copy_(t["opt.v"])
        if self.kind == "adam":
            self.state[:, :dim].copy_(t["opt.m"])
        if self.kind == "rmsprop":
            self.last.copy_(t["opt.last"])
        self.t = int(t["opt.step"][0])
