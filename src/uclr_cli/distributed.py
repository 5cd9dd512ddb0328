"""Data-parallel training over ``torchrun``: the world, the batch split and the gradient sum (docs/distributed.md).

Every rank holds the whole model and draws the same global permutation and
the same negatives for the whole global batch (one generator per (seed,
stage), advanced identically everywhere); each rank then computes the loss of
its contiguous share of the batch, divided by the *global* batch size, and
the gradients are summed over the ranks. So every rank applies the update one
process would apply, up to the order of the floating-point additions, and
the ranks stay identical. Only rank 0 prints and writes.

One process (no ``torchrun``, or ``WORLD_SIZE=1``) is :data:`SINGLE`: no
process group, and the stages run the single-process code unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

from uclr_cli.errors import ConfigError, TrainingError

#: Seconds a collective (or joining the group) may wait for the other ranks before failing.
TIMEOUT_ENV = "UCLR_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0

#: torchrun's environment variable that a restart needs on torch 2.13 (pytorch issue 135712): unless it is
#: "1", the restarted workers reuse the agent's rendezvous store and fail to connect (gloo) or hang joining.
SHARE_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"

#: True once this process has joined a process group (errors of other ranks are then worth printing).
JOINED = False


def env_rank() -> int:
    """This process's rank as ``torchrun`` sets it (0 without torchrun; a malformed one is refused on joining)."""
    value = os.environ.get("RANK", "0")
    return int(value) if value.isdigit() else 0


def env_world_size() -> int:
    return _env_int("WORLD_SIZE", 1)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer", f"environment variable {name}") from None


def restarts() -> tuple[int, int]:
    """``(restarts so far, restarts allowed)`` of torchrun's worker group (``--max-restarts``); (0, 0) without it."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0), _env_int("TORCHELASTIC_MAX_RESTARTS", 0)


def restart_warning() -> str | None:
    """Why a restart of several ranks would likely fail here (torchrun without ``SHARE_STORE_ENV=1``), or None."""
    if env_world_size() > 1 and restarts()[1] > 0 and os.environ.get(SHARE_STORE_ENV) != "1":
        return (
            f"torchrun restarts need {SHARE_STORE_ENV}=1 in torchrun's environment on torch 2.13 (pytorch issue "
            "135712); without it a restarted rank may fail to connect or hang until UCLR_DIST_TIMEOUT"
        )
    return None


def timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        t = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        t = -1.0
    if not t > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={value!r} must be a positive number of seconds", TIMEOUT_ENV)
    return t


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` data-parallel ranks."""

    rank: int = 0
    size: int = 1
    #: The process group of these ranks; None: the default group (every process torchrun started).
    group: object = None

    @property
    def main(self) -> bool:
        """The rank that prints and writes."""
        return self.rank == 0

    def part(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share ``[lo, hi)`` of a global batch of ``n`` rows: the first ``n % size``
        ranks get one row more (no padding, no dropped rows; a share may be empty)."""
        q, r = divmod(n, self.size)
        lo = self.rank * q + min(self.rank, r)
        return lo, lo + q + (self.rank < r)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (every rank gets the same bits); returns ``t``."""
        if self.size > 1:
            try:
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=self.group)
            except RuntimeError as e:  # gloo/NCCL: a peer gone (connection reset) or the timeout passed
                reason = str(e).split("] ", 1)[-1].split(". ")[0][:120]
                raise TrainingError(
                    f"rank {self.rank}: another rank failed or timed out ({reason}); the last resume state is kept",
                    "distributed training",
                ) from None
        return t

    def rank0s(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """Rank 0's ``flag`` on every rank: for a decision the ranks must take together that they may not
        take alike on their own (one on a clock: when to write a collective checkpoint)."""
        if self.size == 1:
            return flag
        return bool(self.sum_(torch.tensor([1.0 if flag and self.main else 0.0], device=device))[0] > 0)

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        """Sum the parameters' gradients over the ranks (a rank without gradient adds zeros)."""
        if self.size == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self.sum_(p.grad)

    def check_batch(self, batch_size: int, option: str = "--batch-size") -> None:
        """A global batch smaller than the world would leave ranks idle on every step: refused."""
        if batch_size < self.size:
            raise ConfigError(
                f"{batch_size} is smaller than the world size {self.size} (every rank needs a share of each batch)",
                option,
            )


SINGLE = World()


def device_for(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when training on CUDA, else ``device``."""
    if device.type == "cuda" and device.index is None and env_world_size() > 1:
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return device


@contextlib.contextmanager
def joined(device: torch.device):
    """Join the process group ``torchrun`` describes (gloo on CPU, NCCL on CUDA) for the ``with`` block;
    yields the :class:`World` (:data:`SINGLE` without torchrun or with one process)."""
    global JOINED
    size, rank = env_world_size(), _env_int("RANK", 0)
    if size <= 1:
        yield SINGLE
        return
    if not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} is outside 0..{size - 1}", "environment variable RANK")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s())
    try:
        torch.distributed.init_process_group(backend, rank=rank, world_size=size, timeout=timeout)
    except Exception as e:  # a rendezvous that cannot be reached, or the other ranks never came
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        reason = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise TrainingError(f"rank {rank} could not join the process group ({reason})", where) from None
    JOINED = True
    try:
        yield World(rank, size)
    finally:
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()
