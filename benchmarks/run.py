"""One benchmark command: `make bench` (or `python benchmarks/run.py [--only a,b] [--quick]`).

Prints a table of figure, value, target and, where a reference runs in the
same process, the ratio to it (machines are noisy: ratios within one run hold
better than absolute times). Sections:

* prepare   — `uclr prepare amazon` on a generated 20M-row 2014 ratings CSV: wall time, peak RSS
* pretrain  — BPR samples/s at the Amazon shape: the default optimizer (rowwise-rmsprop) and lazy row-wise Adam
              vs dense Adam (the paper's, the in-run reference)
* contrast  — seconds per epoch over all users at the Amazon shape
* finetune  — seconds per epoch per domain at the Amazon shape
* evaluate  — 3 domains x 26,507 users x 100 candidates scored into metrics
* full      — `evaluate --protocol full`'s ranking: every test positive of the 3 domains at the Amazon shape against
              every item the user did not interact with (train + valid left out), m=128
* recommend — full-catalogue top-10 of the largest domain (books) for all 26,507 users at the Amazon shape:
              users/s of the top-K itself, and `uclr recommend --users` end to end in a child with its peak RSS
* baselines — seconds per epoch of BPRMF, NeuMF and LightGCN on domain books at the Amazon shape, of
              CAT-ART's stages (BPR-MF and ART on books, CAT over all users), GA-MTCDR's (estimated) and
              HeroGraph's joint model (one epoch over the three targets)
* quality   — validation NDCG@10 after equal training time (--budget), on the Amazon preset and on Douban
              (../shared/data/douban, when present): our default PGE and the paper's PGE vs `implicit`'s CPU
              BPR (the `bench` extra), implicit's ALS on all domains together (a small grid chosen on
              validation), and our default UCLR (contrast + finetune on the default PGE); all scored by our
              evaluator on the same candidates
* e2e       — prepare -> pretrain -> contrast -> finetune -> evaluate through the CLI, one seed, on the CPU:
              wall time and peak RSS per step
* scaling   — pretrain seconds per epoch and peak RSS at 0.25x to 4x the Amazon shape, one child process per scale
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ROWS: list[tuple[str, str, str, str]] = []


def row(figure: str, value: str, target: str = "", ratio: str = "") -> None:
    ROWS.append((figure, value, target, ratio))
    print(f"  {figure}: {value}  {target}  {ratio}", file=sys.stderr, flush=True)


# Linux gives a child started from this process a peak RSS of at least this process's own peak (exec
# keeps the larger of the old and new address spaces' high-water marks, and a vfork child's old one is
# ours). So children are started by a small launcher that waits for the real command and writes its peak.
_LAUNCH = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def child(cmd: list[str], cwd: Path, capture: bool = False) -> tuple[float, float, str]:
    """Run ``cmd``; return (wall seconds, peak RSS of that child in GB, its stdout if ``capture``).

    The peak is the child's own (``os.wait4`` in a ~10 MB launcher), not a max over all children so far.
    """
    fd, peak_file = tempfile.mkstemp(prefix="uclr-bench-rss-")
    os.close(fd)
    try:
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-c", _LAUNCH, peak_file, *cmd], cwd=cwd, stdout=subprocess.PIPE if capture else None
        )
        wall = time.perf_counter() - t0
        if res.returncode:
            raise subprocess.CalledProcessError(res.returncode, cmd)
        peak_kb = int(Path(peak_file).read_text())  # ru_maxrss is in KB on Linux
    finally:
        os.unlink(peak_file)
    return wall, peak_kb / 1024**2, res.stdout.decode() if capture else ""


def uclr(*args: str, cwd: Path, capture: bool = False):
    """Run the CLI in a child process; return (wall seconds, peak RSS of that child in GB[, stdout])."""
    wall, peak, out = child([sys.executable, "-m", "uclr_cli", "--quiet", *args], cwd, capture)
    return (wall, peak, out) if capture else (wall, peak)


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
    from uclr_cli.data.dataset import load_prepared
    from uclr_cli.stages import pretrain

    data = load_prepared(amazon_data(work, quick))
    n = len(data.train_user)
    speeds = {}
    default = PretrainConfig().optimizer
    for opt in ("adam", default, "rowwise-adam"):
        got = []  # training only (validation is off); the faster of 2 epochs
        cfg = PretrainConfig(optimizer=opt, epochs=2, eval_every=1000, device="cpu")
        pretrain.run_seed(cfg, data, work / f"bench-{opt}", 0, progress=lambda e: got.append(n / e.epoch_s))
        speeds[opt] = max(got)
    row("pretrain dense Adam (--optimizer adam, the paper's), samples/s", f"{speeds['adam']:,.0f}", "reference")
    row(
        f"pretrain {default} (default), samples/s",
        f"{speeds[default]:,.0f}",
        ">= 1,000,000 and >= 20x ref",
        f"{speeds[default] / speeds['adam']:.1f}x",
    )
    row(
        "pretrain rowwise-adam (lazy Adam), samples/s",
        f"{speeds['rowwise-adam']:,.0f}",
        "",
        f"{speeds['rowwise-adam'] / speeds['adam']:.1f}x",
    )
    del torch


def bench_contrast_finetune(work: Path, quick: bool) -> None:
    from uclr_cli.config import ContrastConfig, FinetuneConfig, PretrainConfig
    from uclr_cli.data.dataset import load_prepared
    from uclr_cli.stages import contrast, finetune, pretrain

    data = load_prepared(amazon_data(work, quick))
    run = work / "bench-stages"
    pretrain.run_seed(PretrainConfig(epochs=1, device="cpu"), data, run, 0)
    times = []
    contrast.run_seed(
        ContrastConfig(epochs=2, device="cpu"),
        data,
        run,
        0,
        progress=lambda e: times.append(e.epoch_s),
    )
    row(f"contrast, s/epoch over {data.n_users:,} users", f"{min(times):.2f} s", "<= 2 s")
    for d in data.domains:
        ft = []
        finetune.run_domain(FinetuneConfig(epochs=1, device="cpu"), data, run, 0, d, progress=lambda e: ft.append(e))
        n = int((data.train_domain == data.domain_index(d)).sum())
        row(f"finetune {d}, s/epoch ({n:,} train rows)", f"{ft[0].epoch_s:.2f} s")


def bench_evaluate(work: Path, quick: bool) -> None:
    import torch

    from uclr_cli.metrics import rank_candidates, summarize

    g = torch.Generator().manual_seed(0)
    users, items, m = 26507, 145_000, 128
    uv, iv = torch.randn(users, m, generator=g), torch.randn(items, m, generator=g)
    evs = [
        (
            torch.arange(users),
            torch.randint(0, items, (users,), generator=g),
            torch.randint(0, items, (users, 99), generator=g),
        )
        for _ in range(3)
    ]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for u, p, n in evs:
            summarize(rank_candidates(uv, iv, u, p, n), [10, 20])
        best = min(best, time.perf_counter() - t0)
    row("evaluate 3 x 26,507 users x 100 candidates (m=128)", f"{best:.3f} s", "<= 0.5 s")


def _random_tables(data, m: int = 128, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(data.n_users, m, generator=g), torch.randn(data.n_items, m, generator=g)


def bench_full(work: Path, quick: bool) -> None:
    import torch

    from uclr_cli import catalogue
    from uclr_cli.data.dataset import load_prepared

    data = load_prepared(amazon_data(work, quick))
    uv, iv = _random_tables(data)
    dev = torch.device("cpu")
    t0 = time.perf_counter()
    n_rows = n_cand = 0
    for di, d in enumerate(data.domains):
        lo, hi = data.item_offsets[di], data.item_offsets[di + 1]
        sel = data.train_domain == di
        users = torch.cat([data.train_user[sel], data.valid[d].users])
        items = torch.cat([data.train_item[sel], data.valid[d].pos]) - lo
        excl = catalogue.exclusion_csr(users, items, data.n_users, hi - lo)
        t = data.test[d]
        chunk = catalogue.full_chunk(hi - lo, dev)
        catalogue.full_ranks(catalogue.dot_scores(uv, iv[lo:hi]), t.users, t.pos - lo, hi - lo, excl, chunk)
        n_rows += len(t.users)
        n_cand += len(t.users) * (hi - lo)
    wall = time.perf_counter() - t0
    row(
        f"full evaluate: {n_rows:,} test rows x all unseen items ({n_cand / 1e9:.2f}G scores, m=128), one model",
        f"{wall:.1f} s ({n_rows / wall:,.0f} rows/s)",
        "<= 60 s" if not quick else "",
    )


def bench_recommend(work: Path, quick: bool) -> None:
    import torch

    from uclr_cli import catalogue
    from uclr_cli.config import PretrainConfig
    from uclr_cli.data import ids
    from uclr_cli.data.dataset import load_prepared
    from uclr_cli.stages import pretrain

    path = amazon_data(work, quick)
    data = load_prepared(path)
    sizes = [data.item_offsets[i + 1] - data.item_offsets[i] for i in range(len(data.domains))]
    di = max(range(len(sizes)), key=sizes.__getitem__)
    d, lo, n = data.domains[di], data.item_offsets[di], sizes[di]
    uv, iv = _random_tables(data)
    sel = data.train_domain == di
    excl = catalogue.exclusion_csr(data.train_user[sel], data.train_item[sel] - lo, data.n_users, n)
    chunk = catalogue.full_chunk(n, torch.device("cpu"))
    users = torch.arange(data.n_users)
    t0 = time.perf_counter()
    catalogue.topk_items(catalogue.dot_scores(uv, iv[lo : lo + n]), users, n, 10, excl, chunk)
    wall = time.perf_counter() - t0
    row(
        f"recommend top-10 of {d} ({n:,} items) for {data.n_users:,} users, seen excluded (m=128, chunk {chunk})",
        f"{wall:.1f} s, {data.n_users / wall:,.0f} users/s",
        "well under 60 s" if not quick else "",
    )
    # end to end through the CLI: a PGE checkpoint (1 epoch), every user's raw id in a file, parquet out
    run = work / "bench-recommend"
    if not (run / "seed-0" / "pretrain.safetensors").exists():
        pretrain.run_seed(PretrainConfig(epochs=1, eval_every=1000, device="cpu"), data, run, 0)
    users_file = work / "bench-recommend-users.txt"
    users_file.write_text("\n".join(ids.user_ids(data).tolist()) + "\n")
    out = work / "bench-recommend.parquet"
    wall, peak = uclr(
        "recommend", "--data", str(path), "--run", str(run), "--domain", d, "--users", str(users_file),
        "--out", str(out), "--model", "PGE", "--top", "10", "--device", "cpu", cwd=work,
    )  # fmt: skip
    row(
        f"uclr recommend --users (all {data.n_users:,}) --domain {d} --top 10, child: wall / peak RSS",
        f"{wall:.1f} s ({data.n_users / wall:,.0f} users/s) / {peak:.2f} GB",
        "",
    )


def bench_baselines(work: Path, quick: bool) -> None:
    """Each baseline in its own child process (``--baseline-child``), so that each has its own peak RSS: its rows,
    then that child's wall time and peak RSS."""
    from uclr_cli import registry

    data = amazon_data(work, quick)
    for name in registry.BASELINES:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-child", name, "--work", str(work)]
        cmd += ["--child-data", str(data)]
        wall, rss, text = child(cmd, work, capture=True)
        ROWS.extend(tuple(r) for r in json.loads(text.strip().splitlines()[-1]))
        what = {"ga-mtcdr": "the estimate's walk round and steps", "herograph": "one epoch with validation"}
        row(
            f"baseline {name}: child wall / peak RSS ({what.get(name, '2 epochs with validation')})",
            f"{wall:.0f} s / {rss:.2f} GB",
        )


def _baseline_child(name: str, path: str, work: Path) -> None:
    """Child process of `baselines`: measure baseline ``name`` on ``path``; print its rows as one JSON line."""
    from uclr_cli.config import BaselineConfig
    from uclr_cli.data.dataset import load_prepared
    from uclr_cli.stages import baseline

    data = load_prepared(Path(path))
    if name == "cat-art":
        bench_cat_art(data, work)
    elif name == "ga-mtcdr":
        bench_ga_mtcdr(data)
    elif name == "herograph":
        bench_herograph(data, work)
    else:
        d = "books"
        n = int((data.train_domain == data.domain_index(d)).sum())
        speeds = []  # training only (the epoch's validation is not timed); the faster of 2 epochs
        cfg = BaselineConfig(model=name, epochs=2, device="cpu")  # defaults: m=128, batch 2048, 4 negatives, 3 layers
        baseline.run_domain(cfg, data, work / "bench-baselines", 0, d, progress=lambda e: speeds.append(n / e.epoch_s))
        row(f"baseline {name} {d}, s/epoch ({n:,} train rows)", f"{n / max(speeds):.2f} s")
    print(json.dumps(ROWS))


def bench_herograph(data, work: Path) -> None:
    """HeroGraph at the Amazon shape, defaults (K=128, 30 neighbours, T=2): one epoch of the joint model over every
    target (each gets the largest domain's number of batches), training only, and its validation."""
    from uclr_cli.config import HeroGraphConfig
    from uclr_cli.stages import herograph

    seen = []
    t0 = time.perf_counter()
    cfg = HeroGraphConfig(epochs=1, device="cpu")
    herograph.run_seed(cfg, data, work / "bench-herograph", 0, data.domains, progress=seen.append)
    wall = time.perf_counter() - t0
    steps = len(data.domains) * -(-max(int((data.train_domain == d).sum()) for d in range(len(data.domains))) // 2048)
    row(f"baseline herograph joint, s/epoch over all targets ({steps} steps of 2048)", f"{seen[0].epoch_s:.0f} s")
    row("baseline herograph, one epoch with setup, validation and saving: wall", f"{wall:.0f} s")


def bench_ga_mtcdr(data) -> None:
    """GA-MTCDR at the Amazon shape, defaults (K=128): one walk round of books' skip-gram and 10 joint steps per
    target, extrapolated to an epoch (a full default epoch takes hours here: docs/training.md)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from ga_mtcdr_cost import measure
    from uclr_cli.config import GaMtcdrConfig

    walks = GaMtcdrConfig().walks_per_node
    found = measure(data, rounds=1, steps=10, domains=["books"], say=lambda _line: None)
    row(
        f"baseline ga-mtcdr skip-gram books, s/epoch ({walks} walks per node, estimated)",
        f"{found['skip-gram books']:.0f} s",
    )
    row("baseline ga-mtcdr joint, s/epoch over all targets (estimated from 10 steps each)", f"{found['joint']:.0f} s")


def bench_cat_art(data, work: Path) -> None:
    """CAT-ART's stages at the Amazon shape, defaults (m=128): BPR-MF and ART on books, CAT over all users."""
    from uclr_cli.config import CatArtConfig
    from uclr_cli.stages import cat_art

    cfg = CatArtConfig(epochs=2, cat_epochs=2, device="cpu")
    run = work / "bench-cat-art"
    d = "books"
    seconds: dict[str, list[float]] = {}
    keep = lambda e: seconds.setdefault(e.stage, []).append(e.epoch_s)  # noqa: E731
    for dom in data.domains:  # CAT needs every domain's stage 1
        cat_art.run_mf(cfg, data, run, 0, dom, progress=keep)
    cat_art.run_cat(cfg, data, run, 0, progress=keep)
    cat_art.run_art(cfg, data, run, 0, d, progress=keep)
    n = int((data.train_domain == data.domain_index(d)).sum())
    row(f"baseline cat-art BPR-MF {d}, s/epoch ({n:,} train rows)", f"{min(seconds[f'{cat_art.MF} {d}']):.2f} s")
    row(f"baseline cat-art CAT, s/epoch ({data.n_users:,} users)", f"{min(seconds[cat_art.CAT]):.2f} s")
    row(f"baseline cat-art ART {d}, s/epoch ({n:,} train rows)", f"{min(seconds[f'{cat_art.ART} {d}']):.2f} s")


# --- quality: time to quality against a peer (issue 5) ---------------------------------------------


class _BudgetSpent(Exception):
    """Raised from a stage's progress callback to stop it at an epoch boundary (the stages have no time budget)."""


def _spent(used: float, last_epoch: float, budget: float) -> bool:
    """Stop after this epoch when the next one would end nearer past the budget than this one ends before it."""
    return used + last_epoch / 2 >= budget


def ours_to_budget(data, options: dict, budget: float, run: Path) -> dict:
    """Our PGE (`pretrain.run_seed`, seed 0, ``options`` over the defaults) until ``budget`` seconds of training.

    Only the epochs' training loops count (the time behind the stage's own samples/s); the validation after
    each epoch (our evaluator, the same candidates) and the stage's per-epoch resume checkpoint do not.
    """
    from uclr_cli.config import PretrainConfig
    from uclr_cli.stages import pretrain

    n = len(data.train_user)
    curve: list[tuple[int, float, float]] = []  # (epoch, training seconds so far, valid NDCG@10)

    def on_epoch(e) -> None:
        t = e.epoch_s
        used = (curve[-1][1] if curve else 0.0) + t
        curve.append((e.epoch, used, e.valid_ndcg))
        if _spent(used, t, budget):
            raise _BudgetSpent

    cfg = PretrainConfig(**{**options, "epochs": 1_000_000, "patience": 1_000_000, "eval_every": 1, "device": "cpu"})
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        pretrain.run_seed(cfg, data, run, 0, progress=on_epoch)
    except _BudgetSpent:
        pass
    epoch, used, score = curve[-1]
    return {
        "ndcg": score,
        "epochs": epoch,
        "train_s": used,
        "wall_s": time.perf_counter() - t0,
        "samples_per_s": n * epoch / used,
        "curve": curve,
    }


def train_matrix(data, sparse):
    """The train interactions of every domain as one binary users x items CSR matrix (implicit's input)."""
    u, i = data.train_user.numpy(), data.train_item.numpy()
    ui = sparse.csr_matrix((np.ones(len(u), dtype=np.float32), (u, i)), shape=(data.n_users, data.n_items))
    ui.sum_duplicates()
    ui.data[:] = 1.0
    ui.sort_indices()
    return ui


def implicit_to_budget(data, budget: float, threads: int, factors: int = 128) -> dict | None:
    """`implicit`'s CPU BPR on the same train interactions until ``budget`` seconds of training; None if not installed.

    Continued training: `fit` keeps existing user/item factors (it only creates them when they are None), so
    the model is fitted in chunks of `iterations`: 1 epoch first to time one, then about half of what is left
    each call, then single epochs. `random_state` is a numpy Generator, which `fit` uses as is, so each chunk
    draws fresh samples (an int would replay the same samples every chunk). Only the epochs count: the time
    `fit` reports per epoch to its callback (its per-call set-up is outside, as our set-up and validation are).
    """
    try:
        import scipy.sparse
        from implicit.cpu.bpr import BayesianPersonalizedRanking
    except ImportError:
        return None
    import torch

    from uclr_cli import loop

    ui = train_matrix(data, scipy.sparse)
    model = BayesianPersonalizedRanking(factors=factors, num_threads=threads, random_state=np.random.default_rng(0))
    epochs, calls, used, per, attempts, skipped = 0, 0, 0.0, 0.0, 0, 0
    t0 = time.perf_counter()
    while not epochs or not _spent(used, per, budget):
        k = 1 if not epochs else max(1, int((budget - used) / per / 2))
        times: list[float] = []

        def on_epoch(epoch, elapsed, correct, skip) -> None:
            nonlocal skipped
            times.append(elapsed)
            skipped += skip

        model.iterations = k
        model.fit(ui, show_progress=False, callback=on_epoch)
        calls, epochs, used, per = calls + 1, epochs + k, used + sum(times), times[-1]
        attempts += k * ui.nnz
    wall = time.perf_counter() - t0
    # 128 factors + 1 bias column: the user side of it is fixed at 1, so the dot product adds the item's bias.
    uv, iv = (
        torch.from_numpy(np.ascontiguousarray(model.user_factors)),
        torch.from_numpy(np.ascontiguousarray(model.item_factors)),
    )
    score = loop.mean_score(loop.valid_scores(data, uv, iv, data.valid))
    return {
        "ndcg": score,
        "epochs": epochs,
        "train_s": used,
        "wall_s": wall,
        "fit_calls": calls,
        "samples_per_s": attempts / used,
        "skipped": skipped / attempts,
        "lr": model.learning_rate,
        "reg": model.regularization,
    }


def als_on_validation(data, threads: int) -> dict | None:
    """`implicit`'s ALS on the interactions of all domains together (users shared, one global item index).

    A small grid (factors, regularization, alpha) chosen on the validation candidates; None if not installed.
    """
    try:
        import scipy.sparse
        from implicit.cpu.als import AlternatingLeastSquares
    except ImportError:
        return None
    import torch

    from uclr_cli import loop

    ui = train_matrix(data, scipy.sparse)
    best = None
    for factors in (64, 128):
        for reg in (0.01, 0.1, 1.0):
            for alpha in (1.0, 10.0, 40.0):
                model = AlternatingLeastSquares(
                    factors=factors, regularization=reg, alpha=alpha, num_threads=threads, random_state=0
                )
                t0 = time.perf_counter()
                model.fit(ui, show_progress=False)
                fit_s = time.perf_counter() - t0
                uv = torch.from_numpy(np.ascontiguousarray(model.user_factors))
                iv = torch.from_numpy(np.ascontiguousarray(model.item_factors))
                per = loop.valid_scores(data, uv, iv, data.valid)
                score = loop.mean_score(per)
                if best is None or score > best["ndcg"]:
                    best = {"ndcg": score, "per_domain": per, "fit_s": fit_s, "setting": (factors, reg, alpha)}
    return best


def uclr_on_top(data, pre_run: Path, run: Path) -> tuple[float, float]:
    """Default contrast and finetune on the seed-0 PGE of ``pre_run``: (UCLR valid NDCG@10, seconds)."""
    from uclr_cli import layout
    from uclr_cli.config import ContrastConfig, FinetuneConfig
    from uclr_cli.stages import contrast, evaluate, finetune

    shutil.rmtree(run, ignore_errors=True)
    layout.seed_dir(run, 0).mkdir(parents=True)
    shutil.copy(layout.seed_dir(pre_run, 0) / layout.PRETRAIN, layout.seed_dir(run, 0))
    t0 = time.perf_counter()
    contrast.run_seed(ContrastConfig(device="cpu"), data, run, 0)
    for d in data.domains:
        finetune.run_domain(FinetuneConfig(device="cpu"), data, run, 0, d)
    seconds = time.perf_counter() - t0
    rows = evaluate.run(data, run, split="valid", ks=[10], device="cpu").report.rows
    vals = [r.mean for r in rows if r.model == "UCLR" and r.bucket == "all" and r.metric == "ndcg"]
    return sum(vals) / len(vals) / 100, seconds


def bench_quality(work: Path, quick: bool) -> None:
    import torch

    from uclr_cli.data.dataset import load_prepared

    budget = OPTS.budget if OPTS.budget is not None else (10.0 if quick else 60.0)
    threads = torch.get_num_threads()
    datasets = [("amazon", amazon_data(work, quick))]
    douban = ROOT.parent / "shared" / "data" / "douban"
    if douban.is_dir():
        uclr("prepare", "douban", str(douban), "--out", str(work / "douban"), cwd=work)
        datasets.append(("douban", work / "douban"))
    else:
        row("quality: Douban", f"skipped: {douban} not found")
    paper = tomllib.loads((ROOT / "examples" / "paper" / "pretrain.toml").read_text())
    for name, path in datasets:
        data = load_prepared(path)
        tag = f"quality {name}"
        row(f"{tag}: training budget per model", f"{budget:g} s ({threads} threads, {len(data.train_user):,} rows)")
        peer = implicit_to_budget(data, budget, threads)
        if peer is None:
            row(f"{tag}: implicit BPR", "skipped: `implicit` not importable (pip install '.[bench]')")
        else:
            ref = f"{100 * peer['ndcg']:.2f} %"
            row(f"{tag}: implicit {_implicit_version()} BPR, valid NDCG@10", ref, "reference")
            # Not our objective: hogwild SGD, 128 factors + an item bias, negatives over all domains by popularity.
            row(
                f"{tag}: implicit BPR, epochs / samples/s",
                f"{peer['epochs']} / {peer['samples_per_s']:,.0f}",
                "",
                f"{100 * peer['skipped']:.1f} % skipped",
            )
        als = als_on_validation(data, threads)
        if als is not None:
            f, reg, alpha = als["setting"]
            row(
                f"{tag}: implicit ALS on all domains (grid on valid), valid NDCG@10",
                f"{100 * als['ndcg']:.2f} %",
                "",
                f"factors {f}, reg {reg:g}, alpha {alpha:g}; fit {als['fit_s']:.1f} s",
            )
        for label, options in (("default", {}), ("the paper's", {k: paper[k] for k in paper if k != "epochs"})):
            run = work / f"bench-quality-{name}-{label.replace(' ', '-')}"
            r = ours_to_budget(data, options, budget, run)
            vs = (lambda key, r=r: f"{r[key] / peer[key]:.2f}x implicit") if peer else (lambda key: "")
            target = ">= implicit at equal wall time" if peer and label == "default" else ""
            row(f"{tag}: our PGE ({label}), valid NDCG@10", f"{100 * r['ndcg']:.2f} %", target, vs("ndcg"))
            row(f"{tag}: our PGE ({label}), epochs / samples/s", f"{r['epochs']} / {r['samples_per_s']:,.0f}")
            if peer:
                reach = next((t for _, t, score in r["curve"] if score >= peer["ndcg"]), None)
                row(
                    f"{tag}: our PGE ({label}), training s to implicit's NDCG@10",
                    f"{reach:.1f} s" if reach is not None else "not reached",
                    f"<= {budget:g} s",
                )
            if label == "default":
                score, seconds = uclr_on_top(data, run, work / f"bench-quality-{name}-uclr")
                vs_als = f"{score / als['ndcg']:.2f}x ALS" if als else ""
                row(f"{tag}: our UCLR (defaults, on that PGE), valid NDCG@10", f"{100 * score:.2f} %", "", vs_als)
                row(f"{tag}: our UCLR, contrast + finetune seconds", f"{seconds:.0f} s")


def _implicit_version() -> str:
    try:
        from importlib.metadata import version

        return version("implicit")
    except Exception:
        return ""


# --- e2e: the whole pipeline through the CLI, one seed, CPU ------------------------------------------


def bench_e2e(work: Path, quick: bool) -> None:
    root = work / "e2e"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    data, run = root / "data", root / "run"
    preset = "default" if quick else "amazon"
    opt = OPTS.e2e_optimizer
    flags = ["--data", str(data), "--run", str(run), "--seed", "0", "--device", "cpu"]
    steps = [
        ("prepare", ["prepare", "synthetic", "--preset", preset, "--out", str(data)]),
        ("pretrain", ["pretrain", *flags, *(["--optimizer", opt] if opt else [])]),
        ("contrast", ["contrast", *flags]),
        ("finetune", ["finetune", *flags, "--domain", "all"]),
        ("evaluate", ["evaluate", "--data", str(data), "--run", str(run), "--device", "cpu", "--json"]),
    ]
    total, peak = 0.0, 0.0
    for name, args in steps:
        wall, rss, out = uclr(*args, cwd=work, capture=True)
        total, peak = total + wall, max(peak, rss)
        note = f" ({'--optimizer ' + opt if opt else 'defaults'}, to early stop)" if name == "pretrain" else ""
        row(
            f"e2e ({preset}) {name}{note}: wall, peak RSS",
            f"{wall:.1f} s, {rss:.2f} GB",
            "",
            _epochs_run(run / "seed-0", name),
        )
    row(f"e2e ({preset}), one seed, CPU: total wall", f"{total:.1f} s", "<= 300 s" if not quick else "")
    row(f"e2e ({preset}), one seed, CPU: peak RSS (max over steps)", f"{peak:.2f} GB", "<= 2 GB" if not quick else "")
    rows = json.loads(out)["rows"]
    for model in ("PGE", "UCLR"):
        vals = [
            r["mean"]
            for r in rows
            if r["model"] == model and r["bucket"] == "all" and r["metric"] == "ndcg" and r["k"] == 10
        ]
        if vals:
            row(
                f"e2e ({preset}) test NDCG@10 of {model}, mean over {len(vals)} domains",
                f"{sum(vals) / len(vals):.2f} %",
            )


def _epochs_run(seed_dir: Path, stage: str) -> str:
    """'N ep (best M)' from the stage's resume states, e.g. '116 ep (best 106)'; per domain for finetune."""
    from uclr_cli import checkpoint as ckpt

    parts = []
    for p in sorted(seed_dir.glob(f"{stage}*.resume.safetensors")):
        h = ckpt.read_header(p)
        parts.append(f"{h.get('domain', '') + ' ' if 'domain' in h else ''}{h['epoch']} ep (best {h['best_epoch']})")
    return ", ".join(parts)


# --- scaling: pretrain cost against data size ---------------------------------------------------------


def _pretrain_child(path: str, optimizer: str | None, epochs: int) -> None:
    """Child process of `scaling`: pretrain ``epochs`` epochs on ``path`` and print one JSON line."""
    from uclr_cli.config import PretrainConfig
    from uclr_cli.data.dataset import load_prepared
    from uclr_cli.stages import pretrain

    data = load_prepared(Path(path))
    times: list[float] = []
    run = Path(tempfile.mkdtemp(prefix="uclr-scaling-"))
    try:
        kw = {"optimizer": optimizer} if optimizer else {}
        cfg = PretrainConfig(**kw, epochs=epochs, eval_every=1_000_000, device="cpu")
        pretrain.run_seed(cfg, data, run, 0, progress=lambda e: times.append(e.epoch_s))
    finally:
        shutil.rmtree(run, ignore_errors=True)
    n = len(data.train_user)
    print(json.dumps({"rows": n, "users": data.n_users, "items": data.n_items, "epoch_s": min(times)}))


def bench_scaling(work: Path, quick: bool) -> None:
    from uclr_cli.config import PretrainConfig
    from uclr_cli.data.synthetic import PRESETS

    base = PRESETS["amazon"]
    default = PretrainConfig().optimizer
    scales = (0.0625, 0.125, 0.25) if quick else (0.25, 0.5, 1.0, 2.0, 4.0)
    # Dense Adam touches every row each step: its epoch grows with rows x steps (quadratic in the scale),
    # ~10 s per epoch at 1x on 2 cores, so it is measured up to 1x only.
    dense_max = 1.0
    prev: dict[str, tuple[float, float]] = {}
    for s in scales:
        out = work / f"scaling-{s:g}x"
        if not (out / "manifest.json").exists():
            items = ",".join(str(max(2, round(n * s))) for n in base.items)
            users = max(2, round(base.users * s))
            inter = ",".join(str(max(users, round(n * s))) for n in base.interactions)
            uclr(
                "prepare",
                "synthetic",
                "--preset",
                "amazon",
                "--users",
                str(users),
                "--items",
                items,
                "--interactions",
                inter,
                "--out",
                str(out),
                cwd=work,
            )
        for opt in (default, "adam"):
            if opt == "adam" and s > dense_max:
                continue
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--pretrain-child",
                str(out),
                "--child-optimizer",
                opt,
                "--child-epochs",
                "2",
            ]
            _, rss, text = child(cmd, work, capture=True)
            r = json.loads(text.strip().splitlines()[-1])
            growth = ""
            if opt in prev:
                growth = f"x{r['epoch_s'] / prev[opt][0]:.2f} time, x{rss / prev[opt][1]:.2f} RSS"
            prev[opt] = (r["epoch_s"], rss)
            if opt == default:
                row(
                    f"scaling {s:g}x Amazon: users / items / train rows",
                    f"{r['users']:,} / {r['items']:,} / {r['rows']:,}",
                )
            name = f"{opt} (default)" if opt == default else "dense Adam"
            row(
                f"scaling {s:g}x: pretrain {name}, s/epoch / s per 1M samples / peak RSS",
                f"{r['epoch_s']:.2f} s / {r['epoch_s'] / (r['rows'] / 1e6):.2f} s / {rss:.2f} GB",
                "growth vs previous: linear = x2" if growth else "",
                growth,
            )


#: the data-parallel commands the `distributed` section runs, in order (contrast and finetune read the
#: pretrain of the same run folder): label, CLI arguments after `uclr_cli`, run folder suffix
DIST_COMMANDS = (
    ("pretrain", ["pretrain"], ""),
    ("contrast", ["contrast"], ""),
    ("finetune books", ["finetune", "--domain", "books"], ""),
    ("baseline bprmf books", ["baseline", "bprmf", "--domain", "books"], "-bprmf"),
    ("baseline cat-art books", ["baseline", "cat-art", "--domain", "books", "--cat-epochs", "2"], "-cat-art"),
)
#: a progress line: its stage (and domain) and the global samples/s of that epoch
_PROGRESS = r"^(\S+(?: [a-z][\w-]*)?) seed=\d+ epoch=\d+/\d+ .* ([\d,]+)/s"


def bench_distributed(work: Path, quick: bool) -> None:
    """The data-parallel commands under `torchrun --standalone` at W = 1 and 2 ranks (gloo on CPU, NCCL on a GPU
    machine), 2 epochs, validation only after the last, each rank on one thread: every stage's global training
    samples/s in its last epoch, and the command's peak RSS (the largest process of the torchrun tree)."""
    import re

    data = amazon_data(work, quick)
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    speed: dict[tuple[str, int], float] = {}
    rss: dict[tuple[str, int], float] = {}
    stages: dict[str, list[str]] = {}
    try:
        for w in (1, 2):
            for label, args, suffix in DIST_COMMANDS:
                run = work / f"dist-w{w}{suffix}"
                if label == "pretrain" or suffix:  # a fresh run folder (contrast and finetune read pretrain's)
                    shutil.rmtree(run, ignore_errors=True)
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={w}"]
                cmd += ["-m", "--", "uclr_cli", *args, "--data", str(data), "--run", str(run)]
                cmd += ["--epochs", "2", "--eval-every", "1000", "--seeds", "0"]
                if label == "pretrain":
                    cmd += ["--save-every", "1000"]
                _, rss[label, w], out = child(cmd, work, capture=True)
                found = dict(re.findall(_PROGRESS, out, flags=re.M))  # the last epoch's line of each stage
                stages[label] = list(found)
                for stage, value in found.items():
                    speed[stage, w] = float(value.replace(",", ""))
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    for label, _, _ in DIST_COMMANDS:
        for stage in stages[label]:
            one, two = speed[stage, 1], speed.get((stage, 2), float("nan"))
            row(
                f"torchrun {stage}: samples/s, W=1 / W=2 (1 thread each)",
                f"{one:,.0f} / {two:,.0f}",
                "",
                f"{two / one:.2f}x",
            )
        row(
            f"torchrun {label}: peak RSS of the largest rank, W=1 / W=2",
            f"{rss[label, 1]:.2f} / {rss[label, 2]:.2f} GB",
        )


SECTIONS = {
    "prepare": bench_prepare,
    "pretrain": bench_pretrain,
    "contrast": bench_contrast_finetune,
    "evaluate": bench_evaluate,
    "full": bench_full,
    "recommend": bench_recommend,
    "baselines": bench_baselines,
    "quality": bench_quality,
    "e2e": bench_e2e,
    "scaling": bench_scaling,
    "distributed": bench_distributed,
}
OPTS = argparse.Namespace(budget=None, e2e_optimizer=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ", ".join(SECTIONS))
    ap.add_argument("--quick", action="store_true", help="small sizes, a few minutes in all")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument(
        "--budget", type=float, default=None, help="quality: training seconds per model (default 60; 10 with --quick)"
    )
    ap.add_argument(
        "--e2e-optimizer", default=None, help="e2e: `uclr pretrain --optimizer` (default: the library's default)"
    )
    ap.add_argument("--pretrain-child", default=None, help=argparse.SUPPRESS)  # scaling: one child per scale
    ap.add_argument("--child-optimizer", default=None, help=argparse.SUPPRESS)  # None: the library's default
    ap.add_argument("--child-epochs", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--baseline-child", default=None, help=argparse.SUPPRESS)  # baselines: one child per model
    ap.add_argument("--child-data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from uclr_cli.malloc import keep_freed_memory

    keep_freed_memory()  # as the CLI does: in-process sections measure what `uclr` gets
    if args.pretrain_child:
        _pretrain_child(args.pretrain_child, args.child_optimizer, args.child_epochs)
        return
    if args.baseline_child:
        _baseline_child(args.baseline_child, args.child_data, Path(args.work))
        return
    OPTS.budget, OPTS.e2e_optimizer = args.budget, args.e2e_optimizer
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
    Console(width=None if sys.stdout.isatty() else 160).print(t)


if __name__ == "__main__":
    main()
