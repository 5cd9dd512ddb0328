"""One benchmark command: `make bench` (or `python benchmarks/run.py [--only a,b] [--quick]`).

Prints a table of figure, value, target and, where a reference runs in the
same process, the ratio to it (machines are noisy: ratios within one run hold
better than absolute times). Sections:

* prepare   — `uclr prepare amazon` on a generated 20M-row 2014 ratings CSV: wall time, peak RSS
* pretrain  — BPR samples/s at the Amazon shape: row-wise Adam (default) vs dense Adam (the paper's)
* contrast  — seconds per epoch over all users at the Amazon shape
* finetune  — seconds per epoch per domain at the Amazon shape
* evaluate  — 3 domains x 26,507 users x 100 candidates scored into metrics
* baselines — seconds per epoch of BPRMF, NeuMF and LightGCN on domain books at the Amazon shape
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ROWS: list[tuple[str, str, str, str]] = []


def row(figure: str, value: str, target: str = "", ratio: str = "") -> None:
    ROWS.append((figure, value, target, ratio))
    print(f"  {figure}: {value}  {target}  {ratio}", file=sys.stderr, flush=True)


def uclr(*args: str, cwd: Path) -> tuple[float, float]:
    """Run the CLI in a child process; return (wall seconds, peak RSS of children in GB)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "uclr_cli", "--quiet", *args], cwd=cwd, check=True)
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, peak_kb / 1024**2


def write_amazon_csv(path: Path, n_rows: int, seed: int = 0, user_offset: int = 0) -> None:
    """A 2014-format ratings CSV (user,item,rating,timestamp, no header), skewed activity and popularity.

    Like the real categories, two files share only part of their users: ids start at ``user_offset``.
    """
    import polars as pl

    rng = np.random.default_rng(seed)
    n_users, n_items = max(n_rows // 8, 10), max(n_rows // 12, 10)
    chunk = 5_000_000
    with open(path, "wb") as f:
        for s in range(0, n_rows, chunk):
            n = min(chunk, n_rows - s)
            df = pl.DataFrame(
                {
                    "u": user_offset + (n_users * rng.random(n) ** 3).astype(np.int64),  # a few very active users
                    "i": (n_items * rng.random(n) ** 2).astype(np.int64),  # popular items
                    "rating": rng.integers(1, 6, n).astype(np.float64),
                    "ts": rng.integers(900_000_000, 1_400_000_000, n),
                }
            ).select(
                pl.concat_str([pl.lit("A"), pl.col("u").cast(pl.String).str.zfill(13)]).alias("user"),
                pl.col("i").cast(pl.String).str.zfill(10).alias("item"),
                "rating",
                "ts",
            )
            df.write_csv(f, include_header=False)


def bench_prepare(work: Path, quick: bool) -> None:
    n = 2_000_000 if quick else 20_000_000
    raw = work / "amazon_raw"
    raw.mkdir(exist_ok=True)
    for k, name in enumerate(("ratings_Books.csv", "ratings_Movies_and_TV.csv")):
        p = raw / name
        if not p.exists():  # the second file's users overlap the first's lowest ~10 % of ids... shifted
            write_amazon_csv(p, n // 2, seed=k, user_offset=k * (n // 2 // 8) * 9 // 10)
    wall, peak = uclr("prepare", "amazon", str(raw), "--out", str(work / "amazon_prep"), cwd=work)
    row(f"prepare amazon, {n / 1e6:.0f}M raw rows: wall", f"{wall:.1f} s", "<= 60 s" if not quick else "")
    row(f"prepare amazon, {n / 1e6:.0f}M raw rows: peak RSS", f"{peak:.2f} GB", "<= 4 GB" if not quick else "")


def amazon_data(work: Path, quick: bool) -> Path:
    out = work / ("synthetic_small" if quick else "synthetic_amazon")
    if not (out / "manifest.json").exists():
        args = ["prepare", "synthetic", "--out", str(out)]
        args += ["--preset", "default"] if quick else ["--preset", "amazon"]
        uclr(*args, cwd=work)
    return out


def bench_pretrain(work: Path, quick: bool) -> None:
    import torch

    from uclr_cli.config import PretrainConfig
    from uclr_cli.data.prepared import load_prepared
    from uclr_cli.stages import pretrain

    data = load_prepared(amazon_data(work, quick))
    speeds = {}
    for opt in ("adam", "rowwise-adam"):
        got = []
        cfg = PretrainConfig(optimizer=opt, epochs=2, eval_every=1000, device="cpu")
        pretrain.run_seed(cfg, data, work / f"bench-{opt}", 0, progress=lambda e: got.append(e.samples_per_s))
        speeds[opt] = max(got)
    row("pretrain dense Adam (default, the paper's), samples/s", f"{speeds['adam']:,.0f}", "reference")
    ratio = speeds["rowwise-adam"] / speeds["adam"]
    row("pretrain row-wise Adam (--optimizer rowwise-adam), samples/s", f"{speeds['rowwise-adam']:,.0f}", ">= 1,000,000 and >= 20x ref", f"{ratio:.1f}x")
    del torch


def bench_contrast_finetune(work: Path, quick: bool) -> None:
    from uclr_cli.config import ContrastConfig, FinetuneConfig, PretrainConfig
    from uclr_cli.data.prepared import load_prepared
    from uclr_cli.stages import contrast, finetune, pretrain

    data = load_prepared(amazon_data(work, quick))
    run = work / "bench-stages"
    pretrain.run_seed(PretrainConfig(epochs=1, device="cpu"), data, run, 0)
    times = []
    contrast.run_seed(ContrastConfig(epochs=2, device="cpu"), data, run, 0, progress=lambda e: times.append(data.n_users / e.samples_per_s))
    row(f"contrast, s/epoch over {data.n_users:,} users", f"{min(times):.2f} s", "<= 2 s")
    for d in data.domains:
        ft = []
        finetune.run_domain(FinetuneConfig(epochs=1, device="cpu"), data, run, 0, d, progress=lambda e: ft.append(e))
        n = int((data.train_domain == data.domain_index(d)).sum())
        row(f"finetune {d}, s/epoch ({n:,} train rows)", f"{n / ft[0].samples_per_s:.2f} s")


def bench_evaluate(work: Path, quick: bool) -> None:
    import torch

    from uclr_cli.metrics import rank_candidates, summarize

    g = torch.Generator().manual_seed(0)
    users, items, m = 26507, 145_000, 128
    uv, iv = torch.randn(users, m, generator=g), torch.randn(items, m, generator=g)
    evs = [
        (torch.arange(users), torch.randint(0, items, (users,), generator=g), torch.randint(0, items, (users, 99), generator=g))
        for _ in range(3)
    ]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for u, p, n in evs:
            summarize(rank_candidates(uv, iv, u, p, n), [10, 20])
        best = min(best, time.perf_counter() - t0)
    row("evaluate 3 x 26,507 users x 100 candidates (m=128)", f"{best:.3f} s", "<= 0.5 s")


def bench_baselines(work: Path, quick: bool) -> None:
    from uclr_cli.config import BaselineConfig
    from uclr_cli.data.prepared import load_prepared
    from uclr_cli.stages import baseline

    data = load_prepared(amazon_data(work, quick))
    d = "books"
    n = int((data.train_domain == data.domain_index(d)).sum())
    for name in baseline.NAMES:
        speeds = []  # training only (the epoch's validation is not timed); the faster of 2 epochs
        cfg = BaselineConfig(model=name, epochs=2, device="cpu")  # defaults: m=128, batch 2048, 4 negatives, 3 layers
        baseline.run_domain(cfg, data, work / "bench-baselines", 0, d, progress=lambda e: speeds.append(e.samples_per_s))
        row(f"baseline {name} {d}, s/epoch ({n:,} train rows)", f"{n / max(speeds):.2f} s")


SECTIONS = {
    "prepare": bench_prepare,
    "pretrain": bench_pretrain,
    "contrast": bench_contrast_finetune,
    "evaluate": bench_evaluate,
    "baselines": bench_baselines,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ", ".join(SECTIONS))
    ap.add_argument("--quick", action="store_true", help="small sizes, a few minutes in all")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="uclr-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in args.only.split(","):
        print(f"[{name}]", file=sys.stderr, flush=True)
        SECTIONS[name](work, args.quick)

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"uclr benchmarks ({os.cpu_count()} CPUs{', quick' if args.quick else ''})")
    for c in ("figure", "value", "target", "ratio"):
        t.add_column(c, justify="left" if c == "figure" else "right")
    for r in ROWS:
        t.add_row(*r)
    Console().print(t)


if __name__ == "__main__":
    main()
