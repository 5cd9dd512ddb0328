"""Shared fixtures: a tiny prepared synthetic dataset and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from uclr_cli.cli.app import app
from uclr_cli.config import PrepareConfig
from uclr_cli.stages import prepare

SHARED_DOUBAN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "douban"

# One intra-op thread for the in-process tests, as for the child processes (run_cli's env below): the number
# of threads changes the order of float reductions, so exact known answers and the small known-answer
# trainings (e.g. GA-MTCDR's two groups) are fixed at one thread. Determinism at a fixed thread count is a
# property of the code, not of this setting (HeroGraph and GA-MTCDR sum repeated rows with index_select's
# ordered backward for that reason).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared tiny synthetic dataset (300 users, 3 domains), built once per session."""
    out = tmp_path_factory.mktemp("prepared") / "tiny"
    prepare.run(PrepareConfig(source="synthetic", preset="tiny", out=out, seed=0))
    return out


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
    """Invoke `uclr` in-process; returns the click Result (exit_code, stdout, stderr)."""
    import os

    runner = CliRunner()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, env=env)
    finally:
        os.chdir(old)


def uclr_process(*args, cwd) -> subprocess.Popen:
    """`python -m uclr_cli ARGS` in a child process (for real kills); one thread, so that every process
    adds floats in the same order and runs compare bit for bit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "uclr_cli", *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
