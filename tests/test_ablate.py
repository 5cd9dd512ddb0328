"""`uclr ablate`: five variants per seed from the CLI, shared PGE, skip what exists."""

from __future__ import annotations

import json

from conftest import run_cli
from uclr_cli import checkpoint as ckpt
from uclr_cli import layout

TINY = """
[pretrain]
dim = 16
batch_size = 256
lr = 0.01
epochs = 4
patience = 2

[contrast]
hidden = [16, 8]
batch_size = 64
lr = 0.003
epochs = 2
patience = 2

[finetune]
rank = 2
batch_size = 256
epochs = 1
"""


def test_ablate_three_seeds_end_to_end_and_skip(tiny_data, tmp_path):
    conf = tmp_path / "ablate.toml"
    conf.write_text(TINY)
    run = tmp_path / "run"
    r = run_cli("ablate", "--data", tiny_data, "--run", run, "--seeds", "0,1,2", "--config", conf, "--device", "cpu")
    assert r.exit_code == 0, r.output
    for s in (0, 1, 2):
        sd = run / f"seed-{s}"
        for name in (
            layout.PRETRAIN,
            *layout.CONTRAST.values(),
            *(layout.finetune_name(d) for d in ("books", "movies", "music")),
        ):
            assert (sd / name).is_file(), (s, name)
        # the contrast variants of a seed share its PGE checkpoint
        sha = ckpt.read_header(sd / layout.CONTRAST["none"])["pretrain_sha256"]
        assert ckpt.read_header(sd / layout.CONTRAST["global"])["pretrain_sha256"] == sha
    out = r.stdout
    for model in ("Random", "Pop", "PGE", "PGE+AE", "PGE+CL-AE", "PGE+UCL-AE", "UCLR"):
        assert model in out
    assert "[1/21]" in r.stderr and "[21/21]" in r.stderr
    stamp = {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}
    # rerun: everything valid is skipped, nothing rewritten
    r2 = run_cli("ablate", "--data", tiny_data, "--run", run, "--seeds", "0,1,2", "--config", conf, "--device", "cpu")
    assert r2.exit_code == 0, r2.output
    assert r2.stderr.count("(done, skipped)") == 21
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")} == stamp
    # a changed finetune setting (--set wins over the TOML's rank = 2) retrains only the finetune steps
    r3 = run_cli(
        "ablate", "--run", run, "--seeds", "0", "--config", conf, "--set", "finetune.rank=3", "--device", "cpu"
    )  # no --data: the run folder records it
    assert r3.exit_code == 0, r3.output
    assert r3.stderr.count("(done, skipped)") == 4
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["ablate-finetune"]["rank"] == 3


def test_ablate_bad_config_key(tiny_data, tmp_path):
    conf = tmp_path / "a.toml"
    conf.write_text("[contrast]\nmask_ratio = 2.0\n")
    r = run_cli("ablate", "--data", tiny_data, "--run", tmp_path / "r", "--config", conf)
    assert r.exit_code == 1 and "mask_ratio" in r.stderr and "[contrast]" in r.stderr
    conf.write_text("[pretrian]\nepochs = 1\n")
    r = run_cli("ablate", "--data", tiny_data, "--run", tmp_path / "r", "--config", conf)
    assert r.exit_code == 1 and "pretrian" in r.stderr
