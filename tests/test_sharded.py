"""Sharded PGE tables (``uclr pretrain --sharding``, docs/distributed.md "Sharded tables").

Default suite: the refusals, one line each, torchrec or not (the import is replaced by one that fails).
Slow, with torchrec only (the ``distributed`` extra; skipped without it): a real ``torchrun --nproc-per-node 2``
with each sharding against the unsharded single-process dense-Adam run, files and tensors, and a resume of the
sharded run's state in one process and of a one-process state sharded again. Every launch runs under a timeout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from uclr_cli import checkpoint as ckpt
from uclr_cli import distributed, sharded

PRETRAIN = ("--dim", "8", "--epochs", "3", "--batch-size", "100", "--seeds", "0", "--save-every", "0")


def _no_torchrec():
    raise ImportError("No module named 'torchrec'")


def test_sharding_without_torchrec_says_what_to_install_in_one_line(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(sharded, "import_torchrec", _no_torchrec)
    r = run_cli("pretrain", "--data", tiny_data, "--run", tmp_path / "r", *PRETRAIN, "--sharding", "table")
    assert r.exit_code == 1
    assert r.stderr.splitlines() == [
        "error: --sharding table needs torchrec (No module named 'torchrec'): pip install 'uclr-cli[distributed]' "
        "&& pip install --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0 (or make install-distributed) (--sharding)"
    ]
    assert not (tmp_path / "r" / "seed-0").exists()
    # --sharding none never looks for torchrec: today's path
    assert (
        run_cli("pretrain", "--data", tiny_data, "--run", tmp_path / "r", *PRETRAIN[:4], "--epochs", "1").exit_code == 0
    )


def test_sharding_refuses_what_it_does_not_train_in_one_line(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(sharded, "import_torchrec", lambda: None)  # as if installed: the other checks
    cases = {
        ("--optimizer", "rowwise-rmsprop"): "error: sharding trains with dense Adam (--optimizer adam); the row-wise "
        "ones are unsharded (--optimizer)",
        ("--encoder", "lightgcn"): "error: sharding applies to --encoder mf only (--sharding)",
        ("--device", "cuda"): "error: --sharding column runs on CPU (gloo) only: the extra installs fbgemm's CPU "
        "build (use --device cpu, or --sharding none for data-parallel CUDA) (--sharding)",
        ("--device", "cpu"): "error: --sharding column splits the tables over torchrun's ranks: launch with torchrun "
        "--nproc-per-node N (N >= 2), or use --sharding none (WORLD_SIZE=1)",
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda passes device resolution
    for args, line in cases.items():
        r = run_cli("pretrain", "--data", tiny_data, "--run", tmp_path / "r", *PRETRAIN, "--sharding", "column", *args)
        assert r.exit_code == 1, args
        assert r.stderr.splitlines() == [line], (args, r.stderr)


def test_split_gives_every_column_to_one_rank():
    for n in (1, 8, 9):
        for parts in (1, 2, 3):
            sizes = sharded.split(n, parts)
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1


def _torchrun(*args, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "--", "uclr_cli", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _max_diff(a: Path, b: Path) -> float:
    """The largest difference of any tensor of two checkpoints with the same names and shapes."""
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["table", "column", "row"])
def test_two_sharded_ranks_equal_one_process(tiny_data, tmp_path, sharding):
    """fp32, 2 gloo ranks: the best tables and the resume state (dense Adam's moments too) equal the
    single-process dense-Adam run within 1e-6 (measured 3e-8 for each sharding: the order of the additions);
    the run folder has the same files; training moved the tables. Row: batches of 1657 of the 4972 train rows,
    so each epoch's last batch has one row and rank 1 an empty share. Column: then a resume of the one-process
    state sharded again, and of the sharded state in one process, equal the one-process resume."""
    pytest.importorskip("torchrec", reason="the distributed extra (make install-distributed) is not installed")
    batch = "1657" if sharding == "row" else "100"
    args = tuple(batch if a == "100" else a for a in PRETRAIN)  # PRETRAIN's --batch-size 100
    one = tmp_path / "one"
    assert run_cli("pretrain", "--data", tiny_data, "--run", one, *args, "--optimizer", "adam").exit_code == 0
    r = _torchrun(
        "pretrain", "--data", tiny_data, "--run", tmp_path / "two", *args, "--sharding", sharding, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert [ln.split(" loss=")[0] for ln in r.stdout.splitlines() if ln.startswith("pretrain seed=")] == [
        f"pretrain seed=0 epoch={e}/3" for e in (1, 2, 3)
    ]
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    assert files(tmp_path / "two") == files(one)
    for name in ("pretrain.safetensors", "pretrain.resume.safetensors"):
        assert _max_diff(one / "seed-0" / name, tmp_path / "two" / "seed-0" / name) < 1e-6, name
    tables = load_file(one / "seed-0" / "pretrain.safetensors")
    g = torch.Generator().manual_seed(0)
    start = torch.randn(tables["user_emb"].shape[0], 8, generator=g) * 0.1  # init_tables: normal, std 0.1
    assert (tables["user_emb"][:, :8] - start).abs().max() > 0.01  # training moved the tables
    assert torch.equal(tables["user_emb"][:, 8], torch.ones(len(start)))  # the bias partner column stays 1
    if sharding != "column":
        return
    more = ("--epochs", "5", "--resume")
    shutil.copytree(one, tmp_path / "again")  # the one-process state, to resume sharded
    assert run_cli("pretrain", "--data", tiny_data, "--run", one, *args, "--optimizer", "adam", *more).exit_code == 0
    # the sharded state resumes in one process (--sharding may differ on a resume: the layout is the same)
    two = run_cli("pretrain", "--data", tiny_data, "--run", tmp_path / "two", *args, "--optimizer", "adam", *more)
    assert two.exit_code == 0, two.stderr
    cmd = ("pretrain", "--data", tiny_data, "--run", tmp_path / "again", *args, "--sharding", sharding, *more)
    r = _torchrun(*cmd, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ckpt.read_header(tmp_path / "again" / "seed-0" / "pretrain.resume.safetensors")["epoch"] == 5
    for run in ("two", "again"):
        for name in ("pretrain.safetensors", "pretrain.resume.safetensors"):
            assert _max_diff(one / "seed-0" / name, tmp_path / run / "seed-0" / name) < 1e-6, (run, name)
