"""Kill and resume, every stage: a run stopped after any epoch and resumed ends bit for bit like an unbroken one.

The "kill" is an exception raised from the progress callback right after an
epoch's resume state was written (what a SIGKILL between two epochs leaves;
a kill inside an epoch resumes from the same state, see test_training's and
test_reliability's process-level kills). Both the best checkpoint and the
final resume state (weights, optimizer moments, τ, log u, generator) must match.
"""

from __future__ import annotations

import itertools
import shutil
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import uclr_process
from uclr_cli import checkpoint as ckpt
from uclr_cli import layout
from uclr_cli.config import BaselineConfig, ContrastConfig, FinetuneConfig, PretrainConfig
from uclr_cli.data.dataset import load_prepared
from uclr_cli.models.autoencoder import AutoEncoder
from uclr_cli.stages import baseline, contrast, finetune, pretrain

PRE = dict(dim=16, batch_size=256, lr=0.01, epochs=3, patience=10, device="cpu", save_every=0)
CON = dict(batch_size=64, lr=0.003, epochs=3, patience=10, device="cpu", hidden=[16, 8])
FT = dict(batch_size=128, lr=0.003, epochs=3, patience=10, device="cpu", rank=4)


class Killed(Exception):
    pass


def kill_after(epoch: int):
    def progress(ev) -> None:
        if ev.epoch == epoch:
            raise Killed

    return progress


@pytest.fixture(scope="module")
def data(tiny_data):
    return load_prepared(tiny_data)


@pytest.fixture(scope="module")
def base_run(data, tmp_path_factory):
    """A seed with PGE and the UCL-AE contrast model, the start of every finetune below."""
    run = tmp_path_factory.mktemp("base")
    pretrain.run_seed(PretrainConfig(**PRE), data, run, 0)
    contrast.run_seed(ContrastConfig(**CON), data, run, 0)
    return run


def same_files(a, b) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb), (a.name, sorted(set(ta) ^ set(tb)))
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{a.name}: {k} differs"
    ha, hb = ckpt.read_header(a), ckpt.read_header(b)
    assert ha["epoch"] == hb["epoch"] and ha["best_score"] == hb["best_score"]


def kill_and_resume(train, run_ref, run_cut, names, at=1) -> None:
    train(run_ref, None, False)
    with pytest.raises(Killed):
        train(run_cut, kill_after(at), False)
    train(run_cut, None, True)
    for name in names:
        same_files(layout.seed_dir(run_ref, 0) / name, layout.seed_dir(run_cut, 0) / name)


PRETRAIN_OPTIONS = [
    dict(optimizer="rowwise-rmsprop"),
    dict(optimizer="rowwise-adam"),
    dict(optimizer="adam"),
    dict(optimizer="rowwise-sgd", item_bias=True, negatives="popularity"),
    dict(optimizer="rowwise-adagrad", negatives="mix", n_negatives=2, init="uniform"),
    dict(encoder="lightgcn", layers=2),
]


@pytest.mark.parametrize("options", PRETRAIN_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_pretrain(data, tmp_path, options):
    cfg = PretrainConfig(**PRE, **options)

    def train(run, progress, resume):
        pretrain.run_seed(cfg, data, run, 0, resume=resume, progress=progress)

    names = [layout.PRETRAIN, layout.resume_name(layout.PRETRAIN)]
    kill_and_resume(train, tmp_path / "ref", tmp_path / "cut", names)


@pytest.mark.parametrize("temperature", ["individual", "global", "none"])
def test_contrast(data, base_run, tmp_path, temperature):
    cfg = ContrastConfig(**CON, temperature=temperature)
    runs = {}
    for name in ("ref", "cut"):
        runs[name] = tmp_path / name
        layout.seed_dir(runs[name], 0).mkdir(parents=True)
        shutil.copy(layout.seed_dir(base_run, 0) / layout.PRETRAIN, layout.seed_dir(runs[name], 0))

    def train(run, progress, resume):
        contrast.run_seed(cfg, data, run, 0, resume=resume, progress=progress)

    name = layout.CONTRAST[temperature]
    kill_and_resume(train, runs["ref"], runs["cut"], [name, layout.resume_name(name)])


FLAGS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("train_ae,train_tau,train_items", FLAGS, ids=lambda v: "ny"[v])
def test_finetune_every_train_option(data, base_run, tmp_path, train_ae, train_tau, train_items):
    """Issue 16 item 1: log u moves every step even with τ frozen; it must come back on resume."""
    cfg = FinetuneConfig(**FT, train_ae=train_ae, train_tau=train_tau, train_items=train_items)
    dom = data.domains[0]
    runs = {}
    for name in ("ref", "cut"):
        runs[name] = tmp_path / name
        shutil.copytree(base_run, runs[name])

    def train(run, progress, resume):
        finetune.run_domain(cfg, data, run, 0, dom, resume=resume, progress=progress)

    name = layout.finetune_name(dom)
    kill_and_resume(train, runs["ref"], runs["cut"], [name, layout.resume_name(name)])


BASELINE_CASES = {
    "bprmf": {},
    "bprmf-bias-rmsprop-pop": dict(item_bias=True, optimizer="rowwise-rmsprop", negatives="popularity"),
    "bprmf-adagrad-mix-2": dict(optimizer="rowwise-adagrad", negatives="mix", n_negatives=2, reg_neg=0.1),
    "bprmf-sgd-uniform-init": dict(optimizer="rowwise-sgd", init="uniform", reg_user=0.0),
    "neumf": dict(n_negatives=2, negatives="popularity"),
    "lightgcn": dict(layers=2, n_negatives=2, reg_pos=0.01),
}


@pytest.mark.parametrize("case", list(BASELINE_CASES))
def test_baseline(data, tmp_path, case):
    kind = case.split("-")[0]
    base = dict(dim=16, batch_size=256, lr=0.01, epochs=3, patience=10, device="cpu")
    cfg = BaselineConfig(model=kind, **base, **BASELINE_CASES[case])
    dom = data.domains[1]

    def train(run, progress, resume):
        baseline.run_domain(cfg, data, run, 0, dom, resume=resume, progress=progress)

    name = layout.baseline_name(kind, dom)
    kill_and_resume(train, tmp_path / "ref", tmp_path / "cut", [name, layout.resume_name(name)])


@pytest.mark.slow  # ~35 s; test_finetune_every_train_option kills finetune in-process, test_training SIGKILLs a process
def test_finetune_sigkill_anywhere_resumes_bit_identical(tiny_data, base_run, tmp_path):
    """A real SIGKILL at an arbitrary point (inside an epoch too), twice, then --resume: as unbroken."""
    args = ["finetune", "--domain", "books", "--rank", "4", "--batch-size", "16", "--epochs", "8"]
    args += ["--patience", "20", "--lr", "0.003", "--data", tiny_data, "--device", "cpu"]
    for name in ("ref", "cut"):
        shutil.copytree(base_run, tmp_path / name)
    ref = uclr_process(*args, "--run", tmp_path / "ref", cwd=tmp_path)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    state = layout.seed_dir(tmp_path / "cut", 0) / layout.resume_name(layout.finetune_name("books"))
    for delay in (0.02, 0.15):
        p = uclr_process(*args, "--run", tmp_path / "cut", *(["--resume"] if state.exists() else []), cwd=tmp_path)
        start_epoch = ckpt.read_header(state)["epoch"] if state.exists() else 0
        deadline = time.time() + 120
        while time.time() < deadline and (not state.exists() or ckpt.read_header(state)["epoch"] <= start_epoch):
            time.sleep(0.005)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not ckpt.read_header(state)["done"], "the run finished before it could be killed; make it longer"
    p = uclr_process(*args, "--run", tmp_path / "cut", "--resume", cwd=tmp_path)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    name = layout.finetune_name("books")
    for n in (name, layout.resume_name(name)):
        same_files(layout.seed_dir(tmp_path / "ref", 0) / n, layout.seed_dir(tmp_path / "cut", 0) / n)


def test_contrast_resume_reads_the_old_optimizer_layout(data, base_run, tmp_path):
    """Resume states written before the one optimizer layout (``opt.<index>.<field>``) still resume exactly."""
    cfg = ContrastConfig(**CON)
    for name in ("ref", "cut"):
        layout.seed_dir(tmp_path / name, 0).mkdir(parents=True)
        shutil.copy(layout.seed_dir(base_run, 0) / layout.PRETRAIN, layout.seed_dir(tmp_path / name, 0))
    contrast.run_seed(cfg, data, tmp_path / "ref", 0)
    with pytest.raises(Killed):
        contrast.run_seed(cfg, data, tmp_path / "cut", 0, progress=kill_after(1))
    state = layout.seed_dir(tmp_path / "cut", 0) / layout.resume_name(layout.CONTRAST["individual"])
    t, meta = load_file(str(state)), ckpt.read_header(state)
    old = {k: v for k, v in t.items() if not k.startswith("opt.")}
    params = [f"ae.{k}" for k, _ in AutoEncoder(16, CON["hidden"]).named_parameters()]
    for i, p in enumerate(params):
        for field in ("step", "exp_avg", "exp_avg_sq"):
            old[f"opt.{i}.{field}"] = t.pop(f"opt.{field}.{p}")
    assert not any(k.startswith("opt.") for k in t)  # every moment was moved to the old names
    ckpt.save(state, old, {k: v for k, v in meta.items() if k not in ("format_version", "package_version")})
    contrast.run_seed(cfg, data, tmp_path / "cut", 0, resume=True)
    name = layout.CONTRAST["individual"]
    same_files(layout.seed_dir(tmp_path / "ref", 0) / name, layout.seed_dir(tmp_path / "cut", 0) / name)
