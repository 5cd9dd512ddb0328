"""Reliability guarantees (docs/reliability.md): bad checkpoints, NaN, Ctrl-C, kills, locks, inputs, disk, relocation.

Everything runs on the tiny synthetic dataset with dim-16 models and a few
epochs; subprocesses get OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from conftest import run_cli
from uclr_cli import checkpoint as ckpt
from uclr_cli import layout
from uclr_cli import loop as stage_common
from uclr_cli.config import PrepareConfig
from uclr_cli.data import readers
from uclr_cli.data.dataset import MANIFEST, load_prepared
from uclr_cli.errors import CheckpointError, DataError
from uclr_cli.lock import LOCK_NAME, RunLock
from uclr_cli.stages import prepare

PRE = [
    "--dim",
    "16",
    "--batch-size",
    "256",
    "--lr",
    "0.01",
    "--device",
    "cpu",
    "--save-every",
    "0",
]  # resume state every epoch
CON = ["--hidden", "16,8", "--batch-size", "64", "--lr", "0.003", "--device", "cpu"]
FT = ["--rank", "2", "--batch-size", "256", "--device", "cpu"]
SAFE = re.compile(r"[a-z0-9][a-z0-9_-]*")


# --------------------------------------------------------------------------- helpers


def one_line_error(r, *needles: str) -> str:
    """Exit 1, stderr exactly one `error: ...` line (no traceback) containing every needle."""
    assert r.exit_code == 1, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def uclr(*args, cwd, stdout=subprocess.DEVNULL):
    """`python -m uclr_cli ARGS` in a subprocess that takes Ctrl-C like a terminal program."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "uclr_cli", *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell may have ignored it
    )


def wait_for(cond, timeout=120.0, step=0.01) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(step)


def state_epoch(path: Path) -> int:
    try:
        return int(ckpt.read_header(path)["epoch"])
    except (CheckpointError, KeyError):
        return 0


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def all_complete(run: Path) -> None:
    """Every checkpoint and config file in ``run`` is complete (loads and checks out), temporaries aside."""
    for p in run.rglob("*.safetensors"):
        meta = ckpt.read_header(p)
        ckpt.load(p, stage=meta["stage"])  # parses, loads, verifies the content checksum
    for p in run.rglob("*.json"):
        json.loads(p.read_text())


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def base_run(tiny_data, tmp_path_factory) -> Path:
    """A complete tiny run: pretrain (2 epochs), contrast UCL-AE (1), finetune music (1)."""
    run = tmp_path_factory.mktemp("base") / "run"
    for args in (
        ["pretrain", *PRE, "--epochs", "2"],
        ["contrast", *CON, "--epochs", "1"],
        ["finetune", *FT, "--domain", "music", "--epochs", "1"],
    ):
        r = run_cli(*args, "--data", tiny_data, "--run", run)
        assert r.exit_code == 0, r.output
    return run


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> Path:
    """Another tiny dataset (other seed, so another fingerprint, same shapes)."""
    out = tmp_path_factory.mktemp("other") / "tiny"
    prepare.run(PrepareConfig(source="synthetic", preset="tiny", out=out, seed=1))
    return out


@pytest.fixture(scope="module")
def foreign(tiny_data, other_data, tmp_path_factory) -> dict[str, Path]:
    """Pretrain checkpoints that do not belong in base_run's seed-0."""
    root = tmp_path_factory.mktemp("foreign")
    out = {}
    for name, data, extra in (
        ("dataset", other_data, ["--seed", "0"]),
        ("seed", tiny_data, ["--seed", "1"]),
        ("dim", tiny_data, ["--seed", "0", "--dim", "32"]),
    ):
        r = run_cli("pretrain", *PRE, "--epochs", "1", *extra, "--data", data, "--run", root / name)
        assert r.exit_code == 0, r.output
        out[name] = next((root / name).glob("seed-*")) / layout.PRETRAIN
    return out


class _Touch:
    """Unpickling this would create ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# --------------------------------------------------------------------------- 1. checkpoints


def _bad_bytes(kind: str, good: bytes, marker: Path) -> bytes:
    n = int.from_bytes(good[:8], "little")
    if kind == "empty":
        return b""
    if kind == "truncated-header":
        return good[:100]
    if kind == "truncated-data":
        return good[: len(good) - 1000]
    if kind == "corrupt-header":
        return good[:8] + b"\x00\xff{" + good[11:]
    if kind == "flipped-data-byte":
        b = bytearray(good)
        b[8 + n + (len(good) - 8 - n) // 2] ^= 0x40
        return bytes(b)
    if kind == "pickle":
        return pickle.dumps({"user_emb": _Touch(str(marker))}, protocol=pickle.HIGHEST_PROTOCOL)
    if kind == "pickle-protocol0":
        return pickle.dumps(_Touch(str(marker)), protocol=0)
    if kind == "torch-save":
        import io

        buf = io.BytesIO()
        torch.save({"user_emb": torch.zeros(3), "x": _Touch(str(marker))}, buf)
        return buf.getvalue()
    if kind == "json":
        return b'{"user_emb": [1, 2, 3]}'
    if kind == "no-metadata":
        from safetensors.torch import save

        return save({"user_emb": torch.zeros(300, 16), "item_emb": torch.zeros(10, 16)})
    raise ValueError(kind)


BAD_FILES = {
    "empty": "truncated header",
    "truncated-header": "not a safetensors file",
    "truncated-data": "corrupt checkpoint",
    "corrupt-header": "not a safetensors file",
    "flipped-data-byte": "content does not match its checksum",
    "pickle": "not a safetensors file",
    "pickle-protocol0": "not a safetensors file",
    "torch-save": "not a safetensors file",
    "json": "not a safetensors file",
    "no-metadata": "no uclr metadata",
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_checkpoint_file_refused_one_line(tiny_data, base_run, tmp_path, kind):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    marker = tmp_path / "UNPICKLED"
    target = run / "seed-0" / layout.PRETRAIN
    target.write_bytes(_bad_bytes(kind, target.read_bytes(), marker))
    for args in (
        ["contrast", *CON, "--epochs", "1"],
        ["finetune", *FT, "--domain", "music", "--epochs", "1"],
        ["evaluate", "--device", "cpu"],
    ):
        r = run_cli(*args, "--data", tiny_data, "--run", run)
        one_line_error(r, BAD_FILES[kind], str(target))
    assert not marker.exists(), "a pickle was unpickled"
    assert not (run / LOCK_NAME).exists()


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("dataset", "trained on another dataset"),
        ("seed", "checkpoint is of seed 1 but lies in seed-0"),
        ("stage", "stage 'contrast', expected 'pretrain'"),
    ],
)
def test_checkpoint_of_other_dataset_seed_stage_refused(tiny_data, base_run, foreign, tmp_path, kind, needle):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    target = run / "seed-0" / layout.PRETRAIN
    src = run / "seed-0" / layout.CONTRAST["individual"] if kind == "stage" else foreign[kind]
    shutil.copyfile(src, target)
    for args in (["contrast", *CON, "--epochs", "1"], ["evaluate", "--device", "cpu"]):
        one_line_error(run_cli(*args, "--data", tiny_data, "--run", run), needle, str(target))


def test_checkpoint_of_other_dimension_refused(tiny_data, base_run, foreign, tmp_path):
    """A dim-32 PGE under a dim-16 run: everything built on it names the mismatch; a resume names `dim`."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    shutil.copyfile(foreign["dim"], run / "seed-0" / layout.PRETRAIN)
    con = run / "seed-0" / layout.CONTRAST["individual"]
    for args in (
        ["finetune", *FT, "--domain", "music", "--epochs", "1"],
        ["evaluate", "--device", "cpu"],
        ["contrast", *CON, "--epochs", "1", "--resume"],
    ):
        line = one_line_error(
            run_cli(*args, "--data", tiny_data, "--run", run), "made from another pretrain checkpoint"
        )
        assert layout.CONTRAST["individual"] in line or layout.resume_name(layout.CONTRAST["individual"]) in line
    assert con.is_file()
    # resuming pretrain with another --dim than its resume state
    shutil.copytree(base_run, tmp_path / "run2")
    r = run_cli(
        "pretrain", *PRE, "--dim", "32", "--epochs", "2", "--resume", "--data", tiny_data, "--run", tmp_path / "run2"
    )
    one_line_error(r, "other config (dim differ)", layout.resume_name(layout.PRETRAIN))


def _resave(path: Path, stage: str, edit) -> None:
    """Rewrite a checkpoint with ``edit(tensors)`` applied, metadata and digest kept valid."""
    t, meta = ckpt.load(path, stage=stage)
    meta = {k: v for k, v in meta.items() if k not in ("format_version", "package_version", ckpt.DIGEST)}
    ckpt.save(path, edit(dict(t)), meta)


@pytest.mark.parametrize(
    "name, stage, key",
    [
        ("finetune-music.safetensors", "finetune", "lora_a"),
        ("finetune-music.safetensors", "finetune", "lora_b"),
        (layout.CONTRAST["individual"], "contrast", "ae.encoder.0.weight"),
    ],
)
def test_checkpoint_with_misshapen_tensor_refused_one_line(tiny_data, base_run, tmp_path, name, stage, key):
    """A valid file whose tensor has the wrong shape (or is missing): one line naming it, no traceback."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    target = run / "seed-0" / name
    t, _ = ckpt.load(target, stage=stage)
    assert key in t, sorted(t)
    _resave(target, stage, lambda t: {**t, key: torch.zeros(t[key].shape[0] + 1, *t[key].shape[1:])})
    one_line_error(
        run_cli("evaluate", "--device", "cpu", "--data", tiny_data, "--run", run), key.removeprefix("ae."), str(target)
    )
    _resave(target, stage, lambda t: {k: v for k, v in t.items() if k != key})
    one_line_error(
        run_cli("evaluate", "--device", "cpu", "--data", tiny_data, "--run", run), key.removeprefix("ae."), str(target)
    )


# --------------------------------------------------------------------------- 1. non-finite loss


@pytest.mark.parametrize("stage_args", [["pretrain", *PRE], ["contrast", *CON]])
def test_nan_loss_stops_with_stage_seed_epoch(tiny_data, base_run, tmp_path, stage_args):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = (run / "seed-0" / layout.PRETRAIN).read_bytes()
    args = [*stage_args, "--lr", "1e30", "--epochs", "3"]  # the later --lr wins
    r = run_cli(*args, "--data", tiny_data, "--run", run)
    one_line_error(r, f"non-finite loss in {stage_args[0]}, seed 0, epoch 1", "--resume", "--lr")
    if stage_args[0] == "pretrain":  # the fresh run failed before it saved anything: the old PGE stays
        assert (run / "seed-0" / layout.PRETRAIN).read_bytes() == before
    all_complete(run)
    assert not (run / LOCK_NAME).exists()


def _nan_at(epoch: int):
    orig = stage_common.check_finite

    def check(loss, stage, seed, ep):
        return orig(float("nan") if ep == epoch else loss, stage, seed, ep)

    return check


def test_nan_keeps_last_good_checkpoint_and_resume_completes(tiny_data, tmp_path, monkeypatch):
    args = ["pretrain", *PRE, "--epochs", "5", "--patience", "10", "--data", tiny_data]
    assert run_cli(*args, "--run", tmp_path / "ref").exit_code == 0
    with monkeypatch.context() as m:
        m.setattr(stage_common, "check_finite", _nan_at(3))
        one_line_error(run_cli(*args, "--run", tmp_path / "cut"), "non-finite loss in pretrain, seed 0, epoch 3")
    sd = tmp_path / "cut" / "seed-0"
    data = load_prepared(tiny_data)
    _, meta = ckpt.load(sd / layout.PRETRAIN, stage="pretrain", fingerprint=data.fingerprint)
    assert 1 <= meta["epoch"] <= 2
    state = ckpt.read_header(sd / layout.resume_name(layout.PRETRAIN))
    assert state["epoch"] == 2 and not state["done"]
    r = run_cli(*args, "--run", tmp_path / "cut", "--resume")
    assert r.exit_code == 0, r.output
    for name in (layout.PRETRAIN, layout.resume_name(layout.PRETRAIN)):
        assert same_tensors(tmp_path / "ref" / "seed-0" / name, sd / name), name


def test_resume_after_nan_with_lower_lr(tiny_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = ["pretrain", *PRE, "--epochs", "5", "--patience", "10", "--data", tiny_data, "--run", run]
    with monkeypatch.context() as m:
        m.setattr(stage_common, "check_finite", _nan_at(3))
        one_line_error(run_cli(*args), "non-finite loss in pretrain, seed 0, epoch 3")
    r = run_cli(*args, "--lr", "0.001", "--resume")
    assert r.exit_code == 0, r.output
    state = ckpt.read_header(run / "seed-0" / layout.resume_name(layout.PRETRAIN))
    assert state["epoch"] == 5 and state["config"]["lr"] == 0.001
    # model-shaping settings still may not change on resume
    one_line_error(run_cli(*args, "--dim", "32", "--resume"), "dim differ")


# --------------------------------------------------------------------------- 1. Ctrl-C and SIGKILL


SIGINT_ARGS = [
    "pretrain",
    "--dim",
    "16",
    "--batch-size",
    "32",
    "--lr",
    "0.005",
    "--epochs",
    "24",
    "--patience",
    "100",
    "--device",
    "cpu",
    "--save-every",
    "0",
]


def test_ctrl_c_exits_130_and_resume_matches_uninterrupted(tiny_data, tmp_path):
    args = [*SIGINT_ARGS, "--data", tiny_data]
    ref = uclr(*args, "--run", tmp_path / "ref", cwd=tmp_path)
    state = tmp_path / "cut" / "seed-0" / layout.resume_name(layout.PRETRAIN)
    for delay in (0.02, 0.25):  # interrupt twice, at different points of an epoch
        start = state_epoch(state)
        p = uclr(*args, "--run", tmp_path / "cut", *(["--resume"] if state.exists() else []), cwd=tmp_path)
        wait_for(lambda: state_epoch(state) > start)
        time.sleep(delay)
        t0 = time.time()
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=30)
        err = p.stderr.read().decode()
        assert rc == 130, err
        assert time.time() - t0 < 5
        assert err.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err
        assert not (tmp_path / "cut" / LOCK_NAME).exists()  # the lock is released
        all_complete(tmp_path / "cut")
    assert not ckpt.read_header(state)["done"], "the run finished before it was interrupted; make it longer"
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    p = uclr(*args, "--run", tmp_path / "cut", "--resume", cwd=tmp_path)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    for name in (layout.PRETRAIN, layout.resume_name(layout.PRETRAIN)):
        assert same_tensors(tmp_path / "ref" / "seed-0" / name, tmp_path / "cut" / "seed-0" / name)
    assert (
        ckpt.read_header(tmp_path / "ref" / "seed-0" / layout.PRETRAIN)["epoch"]
        == ckpt.read_header(tmp_path / "cut" / "seed-0" / layout.PRETRAIN)["epoch"]
    )
    assert no_temporaries(tmp_path / "cut")


ABLATE_TOML = """
[pretrain]
dim = 16
batch_size = 32
lr = 0.005
epochs = 6
patience = 10

[contrast]
hidden = [16, 8]
batch_size = 32
lr = 0.003
epochs = 3
patience = 10

[finetune]
rank = 2
batch_size = 64
epochs = 2
patience = 10
"""


def test_ablate_killed_twice_then_rerun_completes_and_skips(tiny_data, tmp_path):
    conf = tmp_path / "ablate.toml"
    conf.write_text(ABLATE_TOML)
    args = ["ablate", "--data", tiny_data, "--seeds", "0", "--config", conf, "--device", "cpu"]
    ref = uclr(*args, "--run", tmp_path / "ref", cwd=tmp_path)
    cut, sd = tmp_path / "cut", tmp_path / "cut" / "seed-0"
    kill_when = [
        sd / layout.resume_name(layout.PRETRAIN),  # in the middle of pretrain
        sd / layout.resume_name(layout.CONTRAST["global"]),  # in the middle of the second contrast variant
    ]
    for path, delay in zip(kill_when, (0.05, 0.01)):
        p = uclr(*args, "--run", cut, cwd=tmp_path)
        wait_for(lambda: path.exists() or p.poll() is not None)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        all_complete(cut)  # whatever the moment: every file complete (or absent)
    finished = {}
    for st_path in sd.glob("*.resume.safetensors"):
        meta = ckpt.read_header(st_path)
        if meta.get("done"):
            best = sd / st_path.name.replace(".resume", "")
            finished[best.name] = best.stat().st_mtime_ns
    assert layout.PRETRAIN in finished, "the kill came before pretrain finished; kill later"
    assert len(finished) < 7, "the ablation finished before it was killed; make it longer"
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    p = uclr(*args, "--run", cut, cwd=tmp_path)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    err = p.stderr.read().decode()
    assert "PGE seed 0: pretrain (done, skipped)" in err
    assert err.count("(done, skipped)") >= len(finished)
    for name, stamp in finished.items():
        assert (sd / name).stat().st_mtime_ns == stamp, f"{name} was complete but was retrained"
    finetuned = [layout.finetune_name(d) for d in ("books", "movies", "music")]
    names = [layout.PRETRAIN, *layout.CONTRAST.values(), *finetuned]
    for name in names:
        assert same_tensors(tmp_path / "ref" / "seed-0" / name, sd / name), name
    assert no_temporaries(cut) and not (cut / LOCK_NAME).exists()


def test_prepare_killed_at_any_moment_leaves_complete_or_absent(tmp_path):
    out = tmp_path / "data" / "tiny"
    args = ["prepare", "synthetic", "--preset", "tiny", "--out", out]
    for k, delay in enumerate((0.0, 0.01, 0.04)):
        p = uclr(*args, "--seed", str(k), cwd=tmp_path)
        wait_for(lambda: (out.parent / f".tiny.tmp-{p.pid}").exists() or p.poll() is not None, step=0.001)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if out.exists():
            load_prepared(out)  # complete, or absent
    r = run_cli(*args, "--seed", "9")  # a rerun cleans up what the kills left
    assert r.exit_code == 0, r.output
    assert sorted(q.name for q in out.parent.iterdir()) == ["tiny"]


def test_prepare_restores_previous_folder_after_kill_between_renames(tmp_path, tiny_data, monkeypatch):
    """A kill between `out -> .out.old-PID` and `.out.tmp-PID -> out`: the next prepare restores the old folder."""
    out = tmp_path / "tiny"
    dead = _dead_pid()
    shutil.copytree(tiny_data, tmp_path / f".tiny.old-{dead}")
    (tmp_path / f".tiny.tmp-{dead}").mkdir()
    (tmp_path / f".tiny.tmp-{dead}" / "users.parquet").write_bytes(b"PAR1")
    monkeypatch.setattr(pl.DataFrame, "write_parquet", lambda *a, **k: (_ for _ in ()).throw(_enospc()))
    r = run_cli("prepare", "synthetic", "--preset", "tiny", "--seed", "3", "--out", out)
    one_line_error(r, "no space left on device")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["tiny"]
    assert load_prepared(out).fingerprint == load_prepared(tiny_data).fingerprint


# --------------------------------------------------------------------------- 1. one writer per run folder


HOLDER = (
    "import sys, time; from uclr_cli.lock import RunLock; "
    "RunLock(sys.argv[1], 'holder cmd').acquire(); print('held', flush=True); time.sleep(120)"
)


@pytest.fixture
def held_lock(tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert p.stdout.readline().strip() == b"held"
    yield run, p
    p.kill()
    p.wait()


def test_second_writer_refused_while_lock_held(tiny_data, held_lock, tmp_path):
    run, holder = held_lock
    for args in (
        ["pretrain", *PRE, "--epochs", "1"],
        ["contrast", *CON, "--epochs", "1"],
        ["finetune", *FT, "--epochs", "1"],
    ):
        r = run_cli(*args, "--data", tiny_data, "--run", run)
        one_line_error(r, f"run folder is in use by process {holder.pid} (holder cmd)", LOCK_NAME)
    conf = tmp_path / "a.toml"
    conf.write_text(ABLATE_TOML)
    r = run_cli("ablate", "--data", tiny_data, "--run", run, "--seeds", "0", "--config", conf, "--device", "cpu")
    one_line_error(r, f"in use by process {holder.pid}")
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing was written
    # the holder dies without cleaning up (SIGKILL): its lock is stale and taken over
    holder.kill()
    holder.wait()
    assert (run / LOCK_NAME).exists()
    r = run_cli("pretrain", *PRE, "--epochs", "1", "--data", tiny_data, "--run", run)
    assert r.exit_code == 0, r.output
    assert not (run / LOCK_NAME).exists()


def test_two_training_commands_at_once(tiny_data, base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    p = uclr(
        "pretrain",
        "--dim",
        "16",
        "--batch-size",
        "32",
        "--epochs",
        "500",
        "--patience",
        "500",
        "--device",
        "cpu",
        "--save-every",
        "0",
        "--data",
        tiny_data,
        "--run",
        run,
        cwd=tmp_path,
    )
    try:
        wait_for(
            lambda: (
                (run / LOCK_NAME).exists() and state_epoch(run / "seed-0" / layout.resume_name(layout.PRETRAIN)) >= 3
            )
        )
        r = run_cli("contrast", *CON, "--epochs", "1", "--data", tiny_data, "--run", run)
        one_line_error(r, f"run folder is in use by process {p.pid} (uclr pretrain)")
    finally:
        p.kill()
        p.wait()
    r = run_cli("contrast", *CON, "--epochs", "1", "--data", tiny_data, "--run", run)  # stale now: taken over
    assert r.exit_code == 0, r.output


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize(
    "content",
    [
        lambda: json.dumps(
            {"pid": _dead_pid(), "host": socket.gethostname(), "command": "uclr pretrain", "started": "x"}
        ),
        lambda: '{"pid": 12',  # half-written by a killed process
        lambda: "",
    ],
    ids=["dead-pid", "half-written", "empty"],
)
def test_stale_lock_taken_over(tiny_data, tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(content())
    (run / ".config.json.tmp-999999999").write_text("{")  # a killed writer's temporary
    r = run_cli("pretrain", *PRE, "--epochs", "1", "--data", tiny_data, "--run", run)
    assert r.exit_code == 0, r.output
    assert not (run / LOCK_NAME).exists() and no_temporaries(run)


def test_lock_of_another_host_or_live_pid_is_respected(tiny_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "uclr ablate", "started": "x"}))
    r = run_cli("pretrain", *PRE, "--epochs", "1", "--data", tiny_data, "--run", run)
    one_line_error(r, "in use by process 1 on host elsewhere (uclr ablate)")
    # the lock is released on errors, and held only while the command runs
    (run / LOCK_NAME).unlink()
    with RunLock(run, "test"):
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (run / LOCK_NAME).exists()
    with pytest.raises(RuntimeError):
        with RunLock(run, "test"):
            raise RuntimeError("boom")
    assert not (run / LOCK_NAME).exists()


# --------------------------------------------------------------------------- 2. inputs: fuzzing `prepare files`


IDS = [
    "u1",
    "u2",
    "u3",
    "u4",
    "1",
    "01",
    " u1",
    "u 1",
    "../u",
    "/etc/passwd",
    "a\\b",
    "é",
    "用户",
    '"q"',
    "a,b",
    "a\tb",
    "a\nb",
    "",
    "nan",
    "-0",
    "\u0000",
    "x" * 5000,
]
RATINGS = ["5", "4.5", "1", "0", "-1", "nan", "NaN", "inf", "-inf", "", "abc", "1e400", " 3 ", "1,5"]
TIMES = [
    "1",
    "1700000000",
    "-5",
    "1.5",
    "2.0",
    "1e3",
    "",
    "2024-01-02",
    "2024-01-02T03:04:05Z",
    "abc",
    "99999999999999999999",
]
NAMES = [
    "a",
    "b",
    "c",
    "d",
    "e",
    "Books",
    "a b",
    ".",
    "%2e%2e",
    "..a",
    "日本",
    "x.y",
    "-",
    "_",
    "a\nb",
    "CON",
    "con",
    "ü",
    "a;b",
]


@st.composite
def raw_folders(draw):
    """A folder of 1-3 CSV/TSV files: a valid core (3 users x 4 items, odd ids) plus random damage."""
    ids = st.one_of(st.sampled_from([i for i in IDS if i]), st.text(min_size=1, max_size=10))
    users = draw(st.lists(ids, min_size=3, max_size=3, unique=True))  # shared by every file
    files = {}
    for _ in range(draw(st.integers(1, 3))):
        sep = draw(st.sampled_from([",", "\t"]))
        name = draw(st.sampled_from(NAMES)) + (".csv" if sep == "," else draw(st.sampled_from([".tsv", ".TSV"])))
        header = ["user", "item", "rating", "timestamp"]
        if draw(st.booleans()):
            header = draw(
                st.permutations(header + draw(st.lists(st.sampled_from(["x", "", "User", "note", "item"]), max_size=2)))
            )
        items = draw(st.lists(ids, min_size=4, max_size=4, unique=True))
        rows = [
            {"user": u, "item": i, "rating": "4", "timestamp": str(10 * k + j)}
            for k, u in enumerate(users)
            for j, i in enumerate(items)
        ]
        for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 4]))):  # damage
            row = draw(st.sampled_from(rows)) if draw(st.booleans()) else rows.append({}) or rows[-1]
            col = draw(st.sampled_from(header))
            pool = {"rating": RATINGS, "timestamp": TIMES}.get(col, IDS)
            row[col] = draw(st.one_of(st.sampled_from(pool), st.text(max_size=12)))
        quoting = draw(st.sampled_from(["minimal", "all", "none"]))
        lines = []
        for rec in [dict(zip(header, header)), *rows]:
            cells = [str(rec.get(c, "")) for c in header]
            if quoting == "all" or (quoting == "minimal" and sep == ","):
                cells = [
                    '"' + c.replace('"', '""') + '"' if quoting == "all" or any(ch in c for ch in ',"\r\n') else c
                    for c in cells
                ]
            lines.append(sep.join(cells))
        if draw(st.booleans()):
            lines.insert(
                draw(st.integers(1, len(lines))), draw(st.sampled_from(["", " ", "garbage", sep * 7, "\x00\x01"]))
            )
        text = draw(st.sampled_from(["\n", "\r\n"])).join(lines) + draw(st.sampled_from(["", "\n"]))
        enc = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]))
        files[name] = text.encode(enc, errors="replace")
    return files


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw_folders())
def test_fuzz_prepare_files_succeeds_or_fails_cleanly(files):
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "out" / "prepared"
        raw.mkdir()
        for name, content in files.items():
            (raw / name).write_bytes(content)
        r = run_cli("prepare", "files", raw, "--out", out, "--negatives", "2")  # an unexpected exception fails here
        assert "Traceback" not in r.output
        if r.exit_code == 0:
            ds = load_prepared(out)
            assert ds.domains and all(SAFE.fullmatch(d) for d in ds.domains)
            assert sorted(p.name for p in out.iterdir()) == sorted(
                [MANIFEST, *(f"{t}.parquet" for t in ("users", "items", "train", "valid", "test"))]
            )
        else:
            assert r.exit_code == 1, r.output
            lines = r.stderr.strip().splitlines()
            assert lines and lines[-1].startswith("error: ") and all(ln.startswith("warning:") for ln in lines[:-1]), (
                r.stderr
            )
            assert not out.exists()
        siblings = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
        assert siblings == (["prepared"] if r.exit_code == 0 else []), siblings  # no temporary or partial folder


# --------------------------------------------------------------------------- 2. inputs: names never escape


def _tiny_rows(users=6, items=8, per_user=4) -> str:
    rows = (f"u{u},i{(u + k) % items},4,{k}\n" for u in range(users) for k in range(per_user))
    return "user,item,rating,timestamp\n" + "".join(rows)


def test_file_and_domain_names_stay_inside_output(tmp_path, tiny_data):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("..csv", "a b.csv", "%2e%2e.csv", "a..%2f..%2fx.csv", "Ü ber\\x.csv"):
        (raw / name).write_text(_tiny_rows())
    out = tmp_path / "out" / "p"
    r = run_cli("prepare", "files", raw, "--out", out, "--negatives", "2")
    assert r.exit_code == 0, r.output
    ds = load_prepared(out)
    assert sorted(ds.domains) == ["2e2e", "a2f2fx", "a_b", "berx"]  # "..csv" is a hidden file: skipped
    assert {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")} == {"raw", "out"}
    # a domain name that is nothing but path characters
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "%%%.csv").write_text(_tiny_rows())
    one_line_error(run_cli("prepare", "files", bad, "--out", tmp_path / "o2"), "bad domain name", "%%%.csv")
    # synthetic --domains are normalised the same way
    r = run_cli("prepare", "synthetic", "--preset", "tiny", "--domains", "../x,/abs,a b", "--out", tmp_path / "syn")
    assert r.exit_code == 0, r.output
    assert load_prepared(tmp_path / "syn").domains == ["x", "abs", "a_b"]
    # finetune-<domain>.safetensors: train on a domain named from a file name; the file stays in seed-0
    run = tmp_path / "run"
    for args in (
        ["pretrain", *PRE, "--epochs", "1"],
        ["contrast", *CON, "--epochs", "1"],
        ["finetune", *FT, "--domain", "a b", "--epochs", "1"],
    ):
        r = run_cli(*args, "--data", out, "--run", run)
        if args[0] == "finetune":  # `--domain` must be a name of the dataset (normalised names only)
            one_line_error(r, "unknown domain 'a b'")
            r = run_cli(*args[:-4], "--domain", "a_b", "--epochs", "1", "--data", out, "--run", run)
        assert r.exit_code == 0, r.output
    assert (run / "seed-0" / "finetune-a_b.safetensors").is_file()
    assert {p.parent for p in run.rglob("*.safetensors")} == {run / "seed-0"}


@pytest.mark.parametrize("reader", ["amazon", "douban-ratings", "douban-reviews", "files"])
def test_every_reader_normalises_domain_names(tmp_path, reader):
    raw = tmp_path / "raw"
    raw.mkdir()
    if reader == "amazon":
        (raw / "ratings_Books & ../Más.csv".replace("/", "_")).write_text("A1B2C3D4E5F6G7,0001234567,5.0,1000\n")
        found = readers.read_amazon(raw, csv_layout="user-item")
    elif reader == "douban-ratings":
        (raw / "douban_Mo vies..").mkdir()
        (raw / "douban_Mo vies.." / "ratings.dat").write_text("1\t2\t5\n")
        found = readers.read_douban(raw)
    elif reader == "douban-reviews":
        (raw / "Bo..oks reviews_cleaned.txt").write_text("user_id\tbook_id\trating\n1\t2\t5\n")
        found = readers.read_douban(raw)
    else:
        (raw / "%2E%2E Ä.tsv").write_text("user\titem\n1\t2\n")
        found = readers.read_files(raw)
    assert found and all(SAFE.fullmatch(d.name) for d in found), [d.name for d in found]


def test_tampered_manifest_names_refused(tiny_data, tmp_path):
    for key, value in (("domain", "../../evil"), ("domain", "a/b"), ("name", "../../x"), ("name", "..")):
        data = tmp_path / f"d-{key}-{len(value)}"
        shutil.copytree(tiny_data, data)
        mf = json.loads((data / MANIFEST).read_text())
        if key == "domain":
            mf["domains"][0]["name"] = value
        else:
            mf["name"] = value
        (data / MANIFEST).write_text(json.dumps(mf))
        for args in (
            ["finetune", *FT, "--epochs", "1", "--run", tmp_path / "r"],
            ["evaluate", "--run", tmp_path / "r"],
        ):
            one_line_error(run_cli(*args, "--data", data), f"bad {'domain' if key == 'domain' else 'dataset'} name")
    with pytest.raises(DataError, match="bad domain name"):
        layout.finetune_name("../x")


# --------------------------------------------------------------------------- 2. config files and options


BAD_OPTIONS = [
    # (command + flags, TOML text or None, text the error must contain)
    (["pretrain", "--lr", "-1"], None, "--lr"),
    (["pretrain", "--lr", "inf"], None, "--lr"),
    (["pretrain", "--reg", "-0.1"], None, "--reg"),
    (["pretrain", "--epochs", "-1"], None, "--epochs"),
    (["pretrain"], "lr = nan\n", "key 'lr'"),
    (["pretrain"], "learning_rate = 0.1\n", "learning_rate"),
    (["pretrain"], 'dim = "big"\n', "key 'dim'"),
    (["pretrain"], "epochs = 1.5\n", "key 'epochs'"),
    (["pretrain"], "dim = 0\n", "key 'dim'"),
    (["pretrain"], 'optimizer = "sgd"\n', "key 'optimizer'"),
    (["contrast", "--mask-ratio", "1.0"], None, "--mask-ratio"),
    (["contrast", "--mask-ratio", "-0.1"], None, "--mask-ratio"),
    (["contrast", "--tau-min", "1", "--tau-max", "1"], None, "--tau-m"),
    (["contrast", "--tau-min", "2", "--tau-max", "1"], None, "--tau-m"),
    (["contrast", "--tau-lr", "-1"], None, "--tau-lr"),
    (["contrast", "--alpha", "-1"], None, "--alpha"),
    (["contrast", "--hidden", "16,0"], None, "--hidden"),
    (["contrast"], 'temperature = "hot"\n', "key 'temperature'"),
    (["contrast"], "tau_min = 0.5\ntau_max = 0.1\n", "key 'tau_m"),
    (["finetune", "--rank", "0"], None, "--rank"),
    (["finetune", "--rank", "-3"], None, "--rank"),
    (["finetune", "--rank", "17"], None, "--rank"),  # > the PGE dim 16 of base_run
    (["finetune"], "rank = 64\n", "key 'rank'"),
    (["finetune", "--contrast-weight", "-1"], None, "--contrast-weight"),
    (["finetune", "--lora-alpha", "0"], None, "--lora-alpha"),
    (["ablate"], "[finetune]\nrank = 0\n", "[finetune] key 'rank'"),
    (["ablate"], "[pretrain]\ndim = 8\n[finetune]\nrank = 9\n", "[finetune] key 'rank'"),
    (["ablate"], "[contrast]\ntau_min = 2.0\n", "[contrast] key 'tau_m"),
    (["ablate"], "[pretrain]\nfoo = 1\n", "[pretrain] key 'foo'"),
    (["ablate"], '[pretrain]\ndim = "x"\n', "[pretrain] key 'dim'"),
    (["ablate"], 'seeds = "abc"\n', "key 'seeds'"),
    (["ablate"], "domains = 5\n", "key 'domains'"),
    (["ablate"], "device = 3\n", "key 'device'"),
    (["ablate"], "run = 3\n", "key 'run'"),
    (["ablate"], "seedz = [0]\n", "seedz"),
]


@pytest.mark.parametrize(
    "args, toml, needle",
    BAD_OPTIONS,
    ids=[" ".join(a[0:3]) + (f" [{t.strip()}]" if t else "") for a, t, _ in BAD_OPTIONS],
)
def test_bad_config_refused_before_any_work(tiny_data, base_run, tmp_path, args, toml, needle):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    extra = []
    if toml is not None:
        conf = tmp_path / "c.toml"
        conf.write_text(toml)
        extra = ["--config", conf]
    r = run_cli(*args, *extra, "--data", tiny_data, "--run", run, "--device", "cpu")
    one_line_error(r, needle)
    if toml is not None:
        assert "c.toml" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing written, nothing locked


@pytest.mark.parametrize(
    "args", [["prepare", "synthetic", "--drop-items", "-0.1"], ["prepare", "synthetic", "--negatives", "0"]]
)
def test_bad_prepare_options_refused(tmp_path, args):
    r = run_cli(*args, "--out", tmp_path / "o")
    one_line_error(r, args[2])
    assert not (tmp_path / "o").exists()


def test_flag_of_wrong_type_is_a_usage_error(tiny_data, tmp_path):
    """Click's own parsing: exit 2 with the option named, no traceback, nothing written."""
    r = run_cli("pretrain", "--epochs", "abc", "--data", tiny_data, "--run", tmp_path / "run")
    assert r.exit_code == 2 and "--epochs" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()


def test_prepare_never_replaces_a_folder_that_is_not_prepared(tmp_path):
    keep = tmp_path / "docs"
    keep.mkdir()
    (keep / "thesis.tex").write_text("precious")
    r = run_cli("prepare", "synthetic", "--preset", "tiny", "--out", keep)
    one_line_error(r, "not a prepared folder")
    assert (keep / "thesis.tex").read_text() == "precious"
    one_line_error(run_cli("prepare", "synthetic", "--preset", "tiny", "--out", tmp_path / ".."), "must name a folder")


# --------------------------------------------------------------------------- 3. disk full


def _enospc(path=None):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) if path else None)


def test_disk_full_while_saving_checkpoint_keeps_previous(tiny_data, base_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    sd = run / "seed-0"
    before = {p.name: p.read_bytes() for p in sd.iterdir()}
    real = ckpt.save_file
    calls = []

    def full_after(n):
        def save_file(tensors, filename, metadata=None):
            calls.append(filename)
            if len(calls) > n:  # write half of the file, then the disk is full
                Path(filename).write_bytes(b"\0" * 1000)
                raise _enospc(filename)
            return real(tensors, filename, metadata=metadata)

        return save_file

    # a fresh run that would overwrite the PGE: the first save fails, the old files stay as they were
    monkeypatch.setattr(ckpt, "save_file", full_after(0))
    r = run_cli("pretrain", *PRE, "--epochs", "3", "--seed", "0", "--data", tiny_data, "--run", run)
    one_line_error(r, "cannot write checkpoint: no space left on device", str(sd / layout.PRETRAIN))
    assert {p.name: p.read_bytes() for p in sd.iterdir()} == before
    # a run that fills the disk in its second epoch: epoch 1 is complete and --resume continues
    calls.clear()
    monkeypatch.setattr(ckpt, "save_file", full_after(3))
    r = run_cli("pretrain", *PRE, "--epochs", "4", "--patience", "10", "--data", tiny_data, "--run", tmp_path / "r2")
    one_line_error(r, "no space left on device", "safetensors")
    all_complete(tmp_path / "r2")
    assert no_temporaries(tmp_path / "r2") and not (tmp_path / "r2" / LOCK_NAME).exists()
    monkeypatch.setattr(ckpt, "save_file", real)
    r = run_cli(
        "pretrain", *PRE, "--epochs", "4", "--patience", "10", "--data", tiny_data, "--run", tmp_path / "r2", "--resume"
    )
    assert r.exit_code == 0, r.output
    assert ckpt.read_header(tmp_path / "r2" / "seed-0" / layout.resume_name(layout.PRETRAIN))["epoch"] == 4


def test_disk_full_while_writing_config_json(tiny_data, base_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = (run / layout.CONFIG).read_bytes()
    real = os.fsync

    def fsync(fd):  # the disk is full when config.json is flushed
        if ".config.json.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            raise _enospc()
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    r = run_cli("pretrain", *PRE, "--epochs", "1", "--data", tiny_data, "--run", run)
    one_line_error(r, "no space left on device", str(run / layout.CONFIG))
    assert (run / layout.CONFIG).read_bytes() == before and no_temporaries(run)
    assert not (run / LOCK_NAME).exists()


@pytest.mark.parametrize("error", ["oserror", "polars"])
def test_disk_full_while_preparing_keeps_previous_folder(tmp_path, monkeypatch, error):
    out = tmp_path / "data" / "tiny"
    assert run_cli("prepare", "synthetic", "--preset", "tiny", "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = pl.DataFrame.write_parquet
    calls = []

    def write_parquet(self, file, *a, **kw):
        calls.append(file)
        if len(calls) == 3:
            Path(file).write_bytes(b"PAR1")
            if error == "polars":
                raise pl.exceptions.ComputeError("parquet: underlying IO error: No space left on device (os error 28)")
            raise _enospc(file)
        return real(self, file, *a, **kw)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", write_parquet)
    r = run_cli("prepare", "synthetic", "--preset", "tiny", "--seed", "5", "--out", out)
    one_line_error(r, "cannot write prepared folder: no space left on device", str(out / "train.parquet"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]
    load_prepared(out)


# --------------------------------------------------------------------------- 3. relocation


def test_run_and_data_folders_can_move(tiny_data, tmp_path, monkeypatch):
    a = tmp_path / "machine-a"
    shutil.copytree(tiny_data, a / "data")
    run = a / "run"
    for args in (["pretrain", *PRE, "--epochs", "2"], ["contrast", *CON, "--epochs", "1"]):
        r = run_cli(*args, "--data", a / "data", "--run", run)
        assert r.exit_code == 0, r.output
    ft = ["finetune", *FT, "--domain", "music", "--epochs", "3"]
    with monkeypatch.context() as m:
        m.setattr(stage_common, "check_finite", _nan_at(2))  # stop finetune after epoch 1
        one_line_error(run_cli(*ft, "--data", a / "data", "--run", run), "epoch 2")
    b = tmp_path / "elsewhere" / "machine-b"
    b.parent.mkdir()
    a.rename(b)  # the old paths no longer exist
    for p in b.rglob("*"):
        if p.is_file():
            raw = p.read_bytes()
            for old in (str(tmp_path), str(tiny_data)):
                assert old.encode() not in raw, (p, old)
    for p in b.rglob("*.safetensors"):
        assert str(tmp_path) not in json.dumps(ckpt.read_header(p))
    r = run_cli("evaluate", "--data", b / "data", "--run", b / "run", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert {row["model"] for row in json.loads(r.stdout)["rows"]} >= {"PGE", "PGE+UCL-AE", "UCLR"}
    r = run_cli(*ft, "--resume", "--data", b / "data", "--run", b / "run")
    assert r.exit_code == 0, r.output
    assert ckpt.read_header(b / "run" / "seed-0" / layout.resume_name(layout.finetune_name("music")))["epoch"] == 3
