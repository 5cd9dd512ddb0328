"""Data-parallel training (docs/distributed.md): 2 gloo ranks equal one process.

Library level: two processes spawned with torch.multiprocessing run the row-wise step and the dense autograd
step in float64 with SGD over batches whose last one is uneven (and one with an empty share), against one
process; likewise the contrast and finetune loops (SGD) and the NeuMF and LightGCN baseline steps (their
Adam). CLI level: a real ``torchrun --nproc-per-node 2 -m uclr_cli pretrain`` on the tiny data against the
single-process command, a rank killed under ``torchrun --max-restarts 1`` and resumed, and bad input refused;
slow-marked, the same for contrast, finetune and the baselines, and a rank 0 that fails to write. Every
launch runs under a timeout.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import run_cli
from dist_worker import (
    DCP_BEST_META,
    DCP_META,
    DIM,
    KINDS,
    N_ITEMS,
    N_USERS,
    _baselines_worker,
    _cat_art_worker,
    _dcp_worker,
    _stages_worker,
    _train,
    _worker,
    dcp_tensors,
    train_baseline,
    train_cat_art,
    train_stages,
)
from uclr_cli import checkpoint as ckpt
from uclr_cli import dcp, distributed
from uclr_cli.errors import CheckpointError


def test_part_is_a_contiguous_split_without_padding():
    for n in (0, 1, 2, 7, 8, 9):
        for size in (1, 2, 3):
            parts = [distributed.World(r, size).part(n) for r in range(size)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [hi - lo for lo, hi in parts]
            assert max(sizes) - min(sizes) <= 1


def test_two_ranks_equal_one_process_fp64_sgd(tmp_path):
    """Rank 0 and 1 end bit-identical; both equal one process up to the order of additions (float64:
    relative error below 1e-12; a per-rank negative draw or a local mean is off by 1e-3 and more)."""
    ctx = mp.start_processes(
        _worker, args=(2, f"file://{tmp_path}/rdzv", str(tmp_path)), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 240  # generous: a loaded 2-core machine spawns two torch processes slowly
    while not ctx.join(timeout=5):
        assert time.monotonic() < deadline, "the spawned ranks did not finish in 240 s"
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    for kind in KINDS:
        single = _train(distributed.SINGLE, kind)
        assert torch.equal(ranks[0][kind], ranks[1][kind]), kind
        rel = ((ranks[0][kind] - single).norm() / single.norm()).item()
        assert rel < 1e-12, (kind, rel)
        start = torch.randn(N_USERS + N_ITEMS, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        assert (single - start * 0.3).norm() > 0.05 * single.norm(), kind  # training moved the tables
    seconds, message = (tmp_path / "lost.txt").read_text().split("\n", 1)
    assert "rank 0: another rank failed or timed out" in message and "\n" not in message
    assert float(seconds) < 45  # not the 60 s timeout: the closed connection is noticed at once


def test_contrast_and_finetune_on_two_ranks_equal_one_process_fp64_sgd(tmp_path):
    """The contrast loop (each variant; uneven shares, a skipped batch of one) and the finetune loop (an empty
    BPR share) on 2 ranks end bit-identical and equal to one process within 1e-12 (float64, SGD): the
    autoencoder, LoRA and items, and τ, its momentum and u, which every rank updates for the whole batch."""
    ctx = mp.start_processes(
        _stages_worker, args=(2, f"file://{tmp_path}/rdzv", str(tmp_path)), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        assert time.monotonic() < deadline, "the spawned ranks did not finish in 240 s"
    ranks = [load_file(tmp_path / f"stages{r}.safetensors") for r in (0, 1)]
    single, start = train_stages(distributed.SINGLE), train_stages(distributed.SINGLE, epochs=0)
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    errors = {}
    for k, one in single.items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        if not one.isfinite().all():  # u of a user never drawn: -inf on every side
            assert torch.equal(ranks[0][k], one), k
            continue
        errors[k] = ((ranks[0][k] - one).norm() / one.norm().clamp_min(1e-300)).item()
        assert errors[k] < 1e-12, (k, errors[k])

    def moved(k: str) -> bool:  # training changed it, by far more than the errors above
        if not start[k].isfinite().all():  # u: -inf until the user is drawn
            return not torch.equal(single[k], start[k])
        return ((single[k] - start[k]).norm() > 1e-4 * start[k].norm().clamp_min(1e-3)).item()

    for variant in ("finetune", *(f"contrast-{t}" for t in ("individual", "global", "none"))):
        weights = [k for k in single if k.startswith(f"{variant}/ae.")]
        assert weights and all(moved(k) for k in weights), variant
        if variant != "contrast-none":
            assert moved(f"{variant}/tau") and moved(f"{variant}/log_u"), variant
    assert moved("finetune/lora_a") and moved("finetune/lora_b") and moved("finetune/items")
    print(f"relative error at most {max(errors.values()):.1e}")


def test_baselines_on_two_ranks_equal_one_process_fp64(tmp_path):
    """NeuMF (sparse table gradients summed over the rows the global batch touches, row-wise Adam; Adam on the
    layers) and LightGCN (dense Adam) with the baseline stage's optimizers, float64, batches of 8, 8, 1 (an
    empty share): 2 ranks bit-identical, equal to one process within 1e-12. Adam, unlike SGD, hides a gradient
    off by a constant factor but for its eps; a local mean in NeuMF's step (uneven shares) is off by 2e-3."""
    # one process first: the ranks are forked with torch.optim's lazy imports done (seconds each otherwise)
    kinds = ("neumf", "lightgcn")
    singles = {kind: train_baseline(distributed.SINGLE, kind) for kind in kinds}
    ctx = mp.start_processes(
        _baselines_worker, args=(2, f"file://{tmp_path}/rdzv", str(tmp_path)), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        assert time.monotonic() < deadline, "the spawned ranks did not finish in 240 s"
    ranks = [load_file(tmp_path / f"baselines{r}.safetensors") for r in (0, 1)]
    errors = {}
    for kind in kinds:
        single, start = singles[kind], train_baseline(distributed.SINGLE, kind, 0)
        for k, one in single.items():
            two = ranks[0][f"{kind}/{k}"]
            assert torch.equal(two, ranks[1][f"{kind}/{k}"]), (kind, k)
            if not one.is_floating_point():  # Adam's step counters
                assert torch.equal(two, one), (kind, k)
                continue
            errors[kind, k] = ((two - one).norm() / one.norm().clamp_min(1e-300)).item()
            assert errors[kind, k] < 1e-12, (kind, k, errors[kind, k])
            if k in start and not k.startswith("opt"):  # the weights: training moved them
                assert (one - start[k]).norm() > 1e-3 * start[k].norm(), (kind, k)
    print(f"relative error at most {max(errors.values()):.1e}")


def test_cat_art_on_two_ranks_equal_one_process_fp64(tmp_path):
    """CAT-ART's three parts (stage 1's row-wise Adam BPR step, CAT's InfoNCE over the whole batch with each
    rank's anchors, ART with dropout drawn for the whole batch; SGD for the last two), float64, uneven batches
    and an empty share: 2 ranks bit-identical, equal to one process within 1e-12. Without the division by
    the global batch (a local mean in CAT and ART) the error is 1e-2 and more."""
    single, start = train_cat_art(distributed.SINGLE), train_cat_art(distributed.SINGLE, 0)
    ctx = mp.start_processes(
        _cat_art_worker, args=(2, f"file://{tmp_path}/rdzv", str(tmp_path)), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        assert time.monotonic() < deadline, "the spawned ranks did not finish in 240 s"
    ranks = [load_file(tmp_path / f"cat_art{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    errors = {}
    for k, one in single.items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        if k == "art/attention.1.bias":  # the keys' bias: softmax ignores it, its gradient is 0 up to rounding
            assert (ranks[0][k] - one).abs().max() < 1e-12 and (one - start[k]).abs().max() < 1e-12, k
            continue
        errors[k] = ((ranks[0][k] - one).norm() / one.norm().clamp_min(1e-300)).item()
        assert errors[k] < 1e-12, (k, errors[k])
        if k != "art/z" and not k.startswith("mf/"):  # the weights: training moved them (z is frozen)
            assert (one - start[k]).norm() > 1e-4 * start[k].norm().clamp_min(1e-3), k
    assert (single["mf/emb"] - start["mf/emb"]).norm() > 1e-3 * start["mf/emb"].norm()
    print(f"relative error at most {max(errors.values()):.1e}")


def _torchrun(nproc: int, *args, cwd: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "--", "uclr_cli", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


PRETRAIN = ("--dim", "8", "--epochs", "3", "--batch-size", "100", "--seeds", "0", "--save-every", "0")


def test_torchrun_pretrain_equals_one_process(tiny_data, tmp_path):
    """fp32 under torchrun with 2 ranks: the checkpoint equals the single-process one within 1e-5 (float
    reordering of the gradient sums, measured ~3e-8); only rank 0 prints and writes."""
    assert run_cli("pretrain", "--data", tiny_data, "--run", tmp_path / "one", *PRETRAIN).exit_code == 0
    r = _torchrun(2, "pretrain", "--data", tiny_data, "--run", tmp_path / "two", *PRETRAIN, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [ln.split(" loss=")[0] for ln in r.stdout.splitlines() if ln.startswith("pretrain seed=")] == [
        f"pretrain seed=0 epoch={e}/3" for e in (1, 2, 3)
    ]
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    assert files(tmp_path / "two") == files(tmp_path / "one")
    for name in ("pretrain.safetensors", "pretrain.resume.safetensors"):
        one, two = (load_file(tmp_path / run / "seed-0" / name) for run in ("one", "two"))
        assert one.keys() == two.keys()
        for k in one:
            assert torch.allclose(one[k].double(), two[k].double(), rtol=1e-5, atol=1e-5), (name, k)
        assert torch.equal(one["rng"], two["rng"]) if "rng" in one else True
    # the resume state is the whole (replicated) state: the 2-rank run resumes in one process, as the other
    for run in ("one", "two"):
        more = ("--epochs", "4", "--resume")
        assert run_cli("pretrain", "--data", tiny_data, "--run", tmp_path / run, *PRETRAIN, *more).exit_code == 0
    one, two = (load_file(tmp_path / run / "seed-0" / "pretrain.resume.safetensors") for run in ("one", "two"))
    assert ckpt.read_header(tmp_path / "two" / "seed-0" / "pretrain.resume.safetensors")["epoch"] == 4
    assert all(torch.allclose(one[k].double(), two[k].double(), rtol=1e-5, atol=1e-5) for k in one)


CONTRAST = ("--hidden", "8,4", "--epochs", "3", "--batch-size", "64", "--seeds", "0")


@pytest.mark.slow  # 18 s here: two torchrun ranks and three single-process runs
def test_torchrun_contrast_equals_one_process(tiny_data, tmp_path):
    """fp32 under torchrun with 2 ranks (300 users: batches of 64 and a last one of 44): the autoencoder, τ
    and u equal the single-process run's within 1e-5; only rank 0 prints and writes; it resumes in one
    process."""
    assert run_cli("pretrain", "--data", tiny_data, "--run", tmp_path / "one", *PRETRAIN).exit_code == 0
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    assert run_cli("contrast", "--data", tiny_data, "--run", tmp_path / "one", *CONTRAST).exit_code == 0
    r = _torchrun(2, "contrast", "--data", tiny_data, "--run", tmp_path / "two", *CONTRAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [ln.split(" loss=")[0] for ln in r.stdout.splitlines() if ln.startswith("contrast seed=")] == [
        f"contrast seed=0 epoch={e}/3" for e in (1, 2, 3)
    ]
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    assert files(tmp_path / "two") == files(tmp_path / "one")
    for name in ("contrast.safetensors", "contrast.resume.safetensors"):
        one, two = (load_file(tmp_path / run / "seed-0" / name) for run in ("one", "two"))
        assert one.keys() == two.keys()
        for k in one:
            assert torch.allclose(one[k].double(), two[k].double(), rtol=1e-5, atol=1e-5), (name, k)
        assert torch.equal(one["rng"], two["rng"]) if "rng" in one else True
    tau = load_file(tmp_path / "one" / "seed-0" / "contrast.safetensors")["tau"]
    assert not torch.allclose(tau, torch.full_like(tau, 0.1)), "τ did not train"
    for run in ("one", "two"):  # the 2-rank run's resume state resumes in one process, as the other
        more = ("--epochs", "4", "--resume")
        assert run_cli("contrast", "--data", tiny_data, "--run", tmp_path / run, *CONTRAST, *more).exit_code == 0
    one, two = (load_file(tmp_path / run / "seed-0" / "contrast.resume.safetensors") for run in ("one", "two"))
    assert all(torch.allclose(one[k].double(), two[k].double(), rtol=1e-5, atol=1e-5) for k in one)


@pytest.mark.slow  # 12 s here
def test_rank_0_failing_to_write_ends_every_rank_in_one_line_each(tiny_data, tmp_path):
    """Only rank 0 writes contrast's files: when that fails (here its resume state's path is a folder), rank 0
    ends with its error, and rank 1 at its next collective with one line, at once rather than at the timeout."""
    assert run_cli("pretrain", "--data", tiny_data, "--run", tmp_path, *PRETRAIN).exit_code == 0
    (tmp_path / "seed-0" / "contrast.resume.safetensors").mkdir()
    t0 = time.monotonic()
    r = _torchrun(2, "contrast", "--data", tiny_data, "--run", tmp_path, *CONTRAST, cwd=tmp_path)
    assert time.monotonic() - t0 < 50  # the collectives' timeout is 60 s
    assert r.returncode != 0
    errors = sorted(ln for ln in r.stderr.splitlines() if ln.startswith("error:"))  # either may come first
    assert len(errors) == 2, r.stderr[-2000:]
    assert errors[0].startswith("error: cannot write checkpoint: is a directory"), errors
    assert errors[1].startswith("error: rank 1: another rank failed or timed out ("), errors


FINETUNE = ("--rank", "4", "--epochs", "2", "--batch-size", "256", "--contrast-users", "64", "--seeds", "0")


@pytest.mark.slow  # 20 s here
def test_torchrun_finetune_equals_one_process(tiny_data, tmp_path):
    """fp32 under torchrun with 2 ranks, every domain: the adapters and τ, u equal the single-process run's
    within 1e-5; only rank 0 prints and writes."""
    assert run_cli("pretrain", "--data", tiny_data, "--run", tmp_path / "one", *PRETRAIN).exit_code == 0
    assert run_cli("contrast", "--data", tiny_data, "--run", tmp_path / "one", *CONTRAST).exit_code == 0
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    assert run_cli("finetune", "--data", tiny_data, "--run", tmp_path / "one", *FINETUNE).exit_code == 0
    r = _torchrun(2, "finetune", "--data", tiny_data, "--run", tmp_path / "two", *FINETUNE, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len([ln for ln in r.stdout.splitlines() if ln.startswith("finetune ")]) == 2 * 3  # 2 epochs, 3 domains
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    assert files(tmp_path / "two") == files(tmp_path / "one")
    names = [p.name for p in (tmp_path / "one" / "seed-0").glob("finetune-*.safetensors")]
    assert len(names) == 6, names
    for name in names:
        one, two = (load_file(tmp_path / run / "seed-0" / name) for run in ("one", "two"))
        assert one.keys() == two.keys()
        for k in one:
            assert torch.allclose(one[k].double(), two[k].double(), rtol=1e-5, atol=1e-5), (name, k)
        if name.endswith(".resume.safetensors"):  # the last epoch's adapter (the best may be the zero one)
            assert one["lora_b"].abs().max() > 1e-4, name


BASELINE = ("--dim", "8", "--epochs", "2", "--batch-size", "100", "--seeds", "0", "--domain", "books")


@pytest.mark.slow  # 11-25 s each here
@pytest.mark.parametrize("kind", ["bprmf", "lightgcn", "neumf"])
def test_torchrun_baseline_equals_one_process(tiny_data, tmp_path, kind):
    """fp32 under torchrun with 2 ranks (NeuMF with its towers first): every checkpoint equals the
    single-process one within 1e-5; only rank 0 prints and writes."""
    more = ("--pretrain-towers",) if kind == "neumf" else ()
    args = ("baseline", kind, "--data", tiny_data, *BASELINE, *more)
    assert run_cli(*args, "--run", tmp_path / "one").exit_code == 0
    r = _torchrun(2, *args, "--run", tmp_path / "two", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    assert files(tmp_path / "two") == files(tmp_path / "one")
    names = [p.name for p in (tmp_path / "one" / "seed-0").glob("baseline-*.safetensors")]
    assert len(names) == (6 if kind == "neumf" else 2), names
    for name in names:
        one, two = (load_file(tmp_path / run / "seed-0" / name) for run in ("one", "two"))
        assert one.keys() == two.keys()
        for k in one:
            assert torch.allclose(one[k].double(), two[k].double(), rtol=1e-5, atol=1e-5), (name, k)


@pytest.mark.slow
def test_torchrun_cat_art_equals_one_process(tiny_data, tmp_path):
    """fp32 under torchrun with 2 ranks, CAT batches of 47 (an uneven last one): every checkpoint of the three
    stages equals the single-process one within 1e-5; only rank 0 writes."""
    args = ("baseline", "cat-art", "--data", tiny_data, "--dim", "8", "--epochs", "2", "--batch-size", "100")
    args += ("--cat-epochs", "2", "--cat-batch-size", "47", "--seeds", "0", "--domain", "books", "--device", "cpu")
    assert run_cli(*args, "--run", tmp_path / "one").exit_code == 0
    r = _torchrun(2, *args, "--run", tmp_path / "two", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    assert files(tmp_path / "two") == files(tmp_path / "one")
    names = [p.name for p in (tmp_path / "one" / "seed-0").glob("baseline-cat-art-*.safetensors")]
    assert len(names) == 2 * 5, names  # 3 x stage 1, CAT, ART on books; each with its resume state
    for name in names:
        one, two = (load_file(tmp_path / run / "seed-0" / name) for run in ("one", "two"))
        assert one.keys() == two.keys()
        for k in one:
            if k.endswith("attention.1.bias") and "step" not in k:  # the keys' bias (softmax ignores it): a
                # gradient of rounding noise, that Adam scales up to steps of the learning rate; it and its moments
                assert k.startswith("opt.") or (one[k].abs().max() < 1e-3 and two[k].abs().max() < 1e-3), (name, k)
                continue
            assert torch.allclose(one[k].double(), two[k].double(), rtol=1e-5, atol=1e-5), (name, k)


def _children(pid: int) -> dict[str, int]:
    """The worker processes torchrun ``pid`` started, by their RANK (read from /proc)."""
    ranks = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
                ranks[env["RANK"]] = int(d.name)
        except (OSError, KeyError):  # gone meanwhile, or not a worker
            pass
    return ranks


def test_a_rank_killed_mid_run_is_restarted_and_resumes_to_the_unbroken_result(tiny_data, tmp_path):
    """torchrun --max-restarts 1 with --resume: rank 1 is SIGKILLed once the first resume state exists; torchrun
    restarts both ranks, which continue from the last DCP state (no epoch is trained twice), and the final
    checkpoint equals the unbroken single-process run within 1e-6 (float reordering of the gradient sums)."""
    args = (*PRETRAIN[:2], "--epochs", "16", *PRETRAIN[4:], "--patience", "100")
    assert run_cli("pretrain", "--data", tiny_data, "--run", tmp_path / "one", *args).exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", distributed.TIMEOUT_ENV: "60"}
    env[distributed.SHARE_STORE_ENV] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1"]
    cmd += ["-m", "--", "uclr_cli", "pretrain", "--data", str(tiny_data), "--run", str(tmp_path / "two"), *args]
    state = tmp_path / "two" / "seed-0" / "pretrain.dcp" / dcp.MANIFEST  # under torchrun: the DCP state
    with subprocess.Popen(
        cmd + ["--resume"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as p:
        try:
            deadline = time.monotonic() + 120
            while not state.is_file():
                assert p.poll() is None and time.monotonic() < deadline, "no DCP resume state within 120 s"
                time.sleep(0.01)
            os.kill(_children(p.pid)["1"], signal.SIGKILL)
            out = p.communicate(timeout=150)[0]
        finally:  # on a failure, no rank outlives the test
            for pid in _children(p.pid).values() if p.poll() is None else ():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            p.kill()
    assert p.returncode == 0, out[-3000:]
    lines = out.splitlines()
    assert "torchrun restart 1 of 1: continues from the last resume state" in lines, out[-3000:]
    assert not any(ln.startswith("warning:") for ln in lines)
    epochs = lambda part: [int(ln.split("epoch=")[1].split("/")[0]) for ln in part if ln.startswith("pretrain seed=")]  # noqa: E731
    restart = lines.index("torchrun restart 1 of 1: continues from the last resume state")
    before, after = epochs(lines[:restart]), epochs(lines[restart:])
    assert after and after[0] > 1 and after[-1] == 16, (before, after)  # resumed mid-run, not from scratch
    assert after == list(range(after[0], 17)) and before == list(range(1, len(before) + 1)), (before, after)
    assert after[0] <= len(before) + 2  # the line of the last saved epoch may be lost with the stopped rank 0
    for name in ("pretrain.safetensors", "pretrain.resume.safetensors"):
        one, two = (load_file(tmp_path / run / "seed-0" / name) for run in ("one", "two"))
        assert one.keys() == two.keys()
        for k in one:
            assert torch.allclose(one[k].double(), two[k].double(), rtol=1e-6, atol=1e-6), (name, k)
    assert torch.equal(one["rng"], two["rng"])
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    assert files(tmp_path / "two") == files(tmp_path / "one")


def test_restart_warning_names_the_variable_torch_2_13_needs(monkeypatch):
    """Rank 0 warns when torchrun may restart several ranks without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1."""
    monkeypatch.delenv(distributed.SHARE_STORE_ENV, raising=False)
    for size, allowed, warned in (("2", "1", True), ("2", "0", False), ("1", "3", False)):
        monkeypatch.setenv("WORLD_SIZE", size)
        monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", allowed)
        assert (distributed.SHARE_STORE_ENV in (distributed.restart_warning() or "")) is warned, (size, allowed)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(distributed.SHARE_STORE_ENV, "1")
    assert distributed.restart_warning() is None


@pytest.mark.parametrize("resume", [True, False])
def test_rank_0_of_a_restart_says_so_and_warns_first(tiny_data, tmp_path, monkeypatch, resume):
    """As torchrun restarts rank 0 (here refused right after, before joining): the warning, then the restart."""
    monkeypatch.delenv(distributed.SHARE_STORE_ENV, raising=False)
    env = {"WORLD_SIZE": "3", "RANK": "0", "TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_MAX_RESTARTS": "2"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    more = ("--resume",) if resume else ()
    r = run_cli("pretrain", "--data", tiny_data, "--run", tmp_path / "r", "--batch-size", "2", *more)
    assert r.exit_code == 1
    then = "continues from the last resume state" if resume else "starts over (--resume would continue)"
    assert r.stderr.splitlines() == [
        f"warning: {distributed.restart_warning()}",
        f"torchrun restart 1 of 2: {then}",
        "error: 2 is smaller than the world size 3 (every rank needs a share of each batch) (--batch-size)",
    ]


@pytest.mark.parametrize("rank", ["0", "1"])
@pytest.mark.parametrize(
    "command, option", [(("pretrain",), "--batch-size"), (("baseline", "cat-art"), "--cat-batch-size")]
)
def test_a_batch_smaller_than_the_world_is_refused_before_joining(tiny_data, tmp_path, rank, command, option):
    """As torchrun starts rank 0 and 1 of 3 (the refusal comes before any process group, so no rank waits
    for another): one line on rank 0, which names the option; the other ranks exit 1 silently."""
    env = {"WORLD_SIZE": "3", "RANK": rank, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}
    r = run_cli(*command, "--data", tiny_data, "--run", tmp_path / "r", option, "2", env=env)
    assert r.exit_code == 1
    lines = r.stderr.splitlines()
    if rank == "0":
        assert lines == [
            f"error: 2 is smaller than the world size 3 (every rank needs a share of each batch) ({option})"
        ]
    else:
        assert lines == []
    assert not (tmp_path / "r" / "seed-0").exists()


def test_commands_that_are_not_data_parallel_are_refused_under_torchrun(tiny_data, tmp_path):
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    for args in (("baseline", "ga-mtcdr"), ("baseline", "herograph"), ("ablate",)):
        r = run_cli(*args, "--data", tiny_data, "--run", tmp_path / "r", env=env)
        assert r.exit_code == 1
        assert r.stderr.splitlines() == [
            f"error: uclr {' '.join(args)} runs in one process (only pretrain, contrast, finetune and baseline "
            "bprmf, lightgcn, neumf and cat-art are data-parallel); launch it without torchrun (WORLD_SIZE=2)"
        ], r.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("bad", ["x", "0", "-1"])
def test_bad_timeout_is_refused(bad, monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
    with pytest.raises(distributed.ConfigError, match=distributed.TIMEOUT_ENV):
        distributed.timeout_s()


def test_dcp_state_saved_at_2_ranks_loads_at_1_and_3_and_consolidates(tmp_path):
    """A DCP state written by 2 gloo ranks (tables row-sharded: 13 and 11 rows, uneven over 2 and 3) reads back
    bit-equal in one process and on 3 ranks, every rank holding every tensor; consolidating it writes the
    bytes one process's safetensors save writes. No pickle in the folder: safetensors shards and JSON."""
    folder = tmp_path / "seed-0" / "pretrain.dcp"
    folder.parent.mkdir()
    # fork, not spawn: the ranks start with torch imported (9 s instead of 28 s here); each sets one intra-op
    # thread first, as DataLoader's forked workers do, and the parent holds no process group
    ctx = mp.start_processes(
        _dcp_worker, args=(3, f"file://{tmp_path}/rdzv", str(folder)), nprocs=3, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 240  # three torch processes on a loaded 2-core machine start slowly
    while not ctx.join(timeout=5):
        assert time.monotonic() < deadline, "the spawned ranks did not finish in 240 s"
    state, best = dcp_tensors()
    head = dcp.manifest(folder)
    assert head["world_size"] == 2 and head["state_meta"] == DCP_META and head["best_meta"] == DCP_BEST_META
    shards = sorted((folder / head["generation"]).iterdir())
    assert len(shards) == 2 and all(p.suffix == ".safetensors" for p in shards), shards
    assert sorted(p.name for p in folder.iterdir()) == [dcp.MANIFEST, head["generation"]]  # no temporary left
    for path in shards:  # each rank wrote its rows of every table, not a copy of the whole
        rows = load_file(path)
        assert 0 < rows["user_emb"].shape[0] < N_USERS and 0 < rows["opt.v"].shape[0] < N_USERS + N_ITEMS
    want = {**state, **{f"best.{k}": v for k, v in best.items()}}
    for rank in range(3):
        got = load_file(tmp_path / f"load{rank}.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), rank
    one = dcp.load(folder, stage="pretrain-resume", fingerprint="fp")
    assert one[1] == DCP_META and one[3] == DCP_BEST_META
    for got, exp in ((one[0], state), (one[2], best)):
        assert got.keys() == exp.keys() and all(torch.equal(got[k], exp[k]) for k in exp)
    # consolidation: the two files one process writes, byte for byte; the DCP folder is then gone
    out = tmp_path / "seed-0"
    dcp.consolidate(folder, out / "pretrain.safetensors", out / "pretrain.resume.safetensors")
    assert not folder.exists()
    ckpt.save(tmp_path / "best.safetensors", best, DCP_BEST_META)
    ckpt.save(tmp_path / "state.safetensors", state, DCP_META)
    assert (out / "pretrain.safetensors").read_bytes() == (tmp_path / "best.safetensors").read_bytes()
    assert (out / "pretrain.resume.safetensors").read_bytes() == (tmp_path / "state.safetensors").read_bytes()


def test_a_dcp_state_of_another_run_or_damaged_is_refused_in_one_line(tmp_path):
    """As a safetensors resume state is: another dataset or config, a changed byte, a missing shard; a DCP
    folder in torch's default format (its .metadata is a pickle) is refused without being read."""
    folder = tmp_path / "seed-0" / "pretrain.dcp"
    state, best = dcp_tensors()
    dcp.save(folder, distributed.SINGLE, state, DCP_META, best, DCP_BEST_META)  # one process: one shard file
    checks = {"stage": "pretrain-resume", "fingerprint": "fp"}
    assert torch.equal(dcp.load(folder, **checks)[0]["opt.v"], state["opt.v"])
    with pytest.raises(CheckpointError, match=r"^checkpoint was trained on another dataset \(fingerprint differs\)"):
        dcp.load(folder, **{**checks, "fingerprint": "other"})
    with pytest.raises(CheckpointError, match=r"^checkpoint was made with other config \(dim differ\)"):
        dcp.load(folder, **checks, expect={"config": {"dim": DIM + 1}})
    with pytest.raises(CheckpointError, match=r"^DCP state was trained on another dataset than the run's"):
        dcp.consolidate_run(tmp_path, fingerprint="other")
    ckpt.save(folder.parent / "pretrain.resume.safetensors", state, DCP_META)  # saved after the DCP state
    with pytest.raises(CheckpointError, match=r"^DCP state is older than pretrain.resume.safetensors"):
        dcp.consolidate_run(tmp_path, fingerprint="fp")
    assert (folder / dcp.MANIFEST).is_file()  # refused: nothing removed
    (shard,) = (folder / dcp.manifest(folder)["generation"]).iterdir()
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"^corrupt DCP state \(content does not match its checksum\)"):
        dcp.load(folder, **checks)
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"^corrupt DCP state"):
        dcp.load(folder, **checks)
    torch_format = tmp_path / "seed-1" / "pretrain.dcp"
    torch_format.mkdir(parents=True)
    (torch_format / ".metadata").write_bytes(b"\x80\x04not read")
    with pytest.raises(CheckpointError, match="torch's default format"):
        dcp.load(torch_format, stage="pretrain-resume")


def test_an_interrupted_torchrun_pretrain_resumes_in_one_process_or_consolidates(tiny_data, tmp_path):
    """A 2-rank torchrun pretrain killed mid-run leaves a DCP state and no safetensors state; one process
    resumes from it (and ends equal to an unbroken run within 1e-5), and `uclr consolidate` turns it into the
    safetensors pair from which the one-process resume ends bit-equal; a state of another config is refused."""
    args = (*PRETRAIN[:2], "--epochs", "40", *PRETRAIN[4:], "--patience", "100")
    env = {**os.environ, "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "--"]
    cmd += ["uclr_cli", "pretrain", "--data", str(tiny_data), "--run", str(tmp_path / "two"), *args]
    seed = tmp_path / "two" / "seed-0"
    with subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as p:
        try:
            deadline = time.monotonic() + 120
            while not (seed / "pretrain.dcp" / dcp.MANIFEST).is_file():
                assert p.poll() is None and time.monotonic() < deadline, "no DCP state within 120 s"
                time.sleep(0.01)
        finally:  # the whole run stops here, ranks first (the agent would restart nothing: no --max-restarts)
            for pid in _children(p.pid).values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            p.kill()
    assert not (seed / "pretrain.resume.safetensors").exists() and not (seed / "pretrain.safetensors").exists()
    epoch = dcp.manifest(seed / "pretrain.dcp")["state_meta"]["epoch"]
    assert 1 <= epoch < 40, epoch
    shutil.copytree(tmp_path / "two", tmp_path / "cons")
    short = (*PRETRAIN[:2], "--epochs", str(epoch + 2), *PRETRAIN[4:], "--patience", "100")
    assert run_cli("pretrain", "--data", tiny_data, "--run", tmp_path / "one", *short).exit_code == 0
    bad = run_cli("pretrain", "--data", tiny_data, "--run", tmp_path / "two", "--dim", "4", *short[2:], "--resume")
    assert bad.exit_code == 1
    assert bad.stderr.strip() == f"error: checkpoint was made with other config (dim differ) ({seed / 'pretrain.dcp'})"
    assert run_cli("pretrain", "--data", tiny_data, "--run", tmp_path / "two", *short, "--resume").exit_code == 0
    assert not (seed / "pretrain.dcp").exists()  # superseded by the one-process save
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    assert files(tmp_path / "two") == files(tmp_path / "one")
    for name in ("pretrain.safetensors", "pretrain.resume.safetensors"):
        one, two = (load_file(tmp_path / run / "seed-0" / name) for run in ("one", "two"))
        assert one.keys() == two.keys()
        assert all(torch.allclose(one[k].double(), two[k].double(), rtol=1e-5, atol=1e-5) for k in one), name
    assert ckpt.read_header(seed / "pretrain.resume.safetensors")["epoch"] == epoch + 2
    # before consolidation: the next stage says what to run, evaluate warns that the PGE it scores is older
    r = run_cli("contrast", "--data", tiny_data, "--run", tmp_path / "cons", "--seeds", "0", "--epochs", "1")
    cons = tmp_path / "cons" / "seed-0"
    assert r.exit_code == 1 and r.stderr.strip() == (
        "error: pretrain checkpoint is missing; an unfinished torchrun run left its DCP state: run `uclr "
        f"consolidate` ({cons / 'pretrain.safetensors'})"
    )
    shutil.copy(tmp_path / "one" / "seed-0" / "pretrain.safetensors", cons)
    r = run_cli("evaluate", "--data", tiny_data, "--run", tmp_path / "cons")
    assert r.exit_code == 0 and (
        f"warning: {cons}: an unfinished torchrun pretrain left pretrain.dcp; its PGE is older (`uclr consolidate` "
        "writes it)" in " ".join(r.stderr.split())
    ), r.stderr
    r = run_cli("consolidate", "--run", tmp_path / "cons")
    assert r.exit_code == 0, r.stderr
    assert r.stderr.startswith("seed-0: wrote pretrain.safetensors and pretrain.resume.safetensors from pretrain.dcp")
    assert not (tmp_path / "cons" / "seed-0" / "pretrain.dcp").exists()
    assert ckpt.read_header(tmp_path / "cons" / "seed-0" / "pretrain.resume.safetensors")["epoch"] == epoch
    again = run_cli("consolidate", "--run", tmp_path / "cons")
    assert again.exit_code == 1 and "no DCP state to consolidate" in again.stderr
    assert run_cli("pretrain", "--data", tiny_data, "--run", tmp_path / "cons", *short, "--resume").exit_code == 0
    for name in ("pretrain.safetensors", "pretrain.resume.safetensors"):
        two, cons = (load_file(tmp_path / run / "seed-0" / name) for run in ("two", "cons"))
        assert two.keys() == cons.keys() and all(torch.equal(two[k], cons[k]) for k in two), name


def test_a_data_parallel_resume_from_safetensors_carries_the_best_tables_into_its_dcp_saves(tiny_data, tmp_path):
    """Every DCP state holds the best tables, so a data-parallel run that resumes from the safetensors pair
    takes them from pretrain.safetensors (when it is the best epoch the state records); one process does not
    (its best file stays where it is). No collective is involved in reading a safetensors state."""
    from uclr_cli import loop
    from uclr_cli.config import PretrainConfig
    from uclr_cli.data.dataset import load_prepared
    from uclr_cli.stages import pretrain

    assert run_cli("pretrain", "--data", tiny_data, "--run", tmp_path, *PRETRAIN).exit_code == 0
    cfg = PretrainConfig(dim=8, epochs=3, batch_size=100, seeds=[0], save_every=0)  # PRETRAIN's options
    data = load_prepared(tiny_data)
    config = cfg.model_dump(mode="json", exclude={"data", "run", "seeds"})
    out = loop.Outputs.of(pretrain.STAGE, data, tmp_path, 0, "pretrain.safetensors", config)
    saved = load_file(tmp_path / "seed-0" / "pretrain.safetensors")
    for world, carried in ((distributed.World(0, 2), True), (distributed.SINGLE, False)):
        sched, gen = loop.Schedule(cfg.epochs, cfg.patience, cfg.eval_every), torch.Generator()
        t, best = out.resume(sched, gen, world)
        assert t is not None and sched.start == 4
        if not carried:
            assert best is None
            continue
        tables, epoch = best
        assert epoch == sched.best_epoch > 0
        assert tables.keys() == saved.keys() and all(torch.equal(tables[k], saved[k]) for k in saved)
