"""Validation NDCG@10 (mean ± std over seeds) of the training choices, on one prepared folder.

Model selection happens here, on the validation split only. Usage:

    python benchmarks/validation.py --data data/douban --seeds 0,1,2 --run /tmp/valrun \
        [--only pretrain,contrast,finetune,baseline] [--pretrain-grid '{"name": {options}, ...}'] \
        [--baseline-grid '{"name": {options}, ...}'] [--json results.jsonl]

``--pretrain-grid`` replaces the optimizer comparison by named PGE settings
(each run for every seed; the first one feeds the contrast and finetune
sections); ``--baseline-grid`` trains single-domain baselines on every domain.

Prints one table per stage: rows = settings, columns = domains (valid NDCG@10, %).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from uclr_cli.config import BaselineConfig, ContrastConfig, FinetuneConfig, PretrainConfig
from uclr_cli.data.dataset import load_prepared
from uclr_cli.stages import baseline, contrast, finetune, pretrain


def fmt(vals: list[float]) -> str:
    vals = [100 * v for v in vals if not math.isnan(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def table(title: str, rows: dict[str, list], domains: list[str]) -> Table:
    t = Table(title=title)
    t.add_column("setting", no_wrap=True)
    for d in [*domains, "mean", "best epochs", "s/seed"]:
        t.add_column(d, justify="right")
    for name, results in rows.items():
        cells = [fmt([r.per_domain.get(d, math.nan) for r in results]) for d in domains]
        cells.append(fmt([r.best_score for r in results]))
        cells.append(",".join(str(r.best_epoch) for r in results))
        cells.append(f"{statistics.mean(r.seconds for r in results):.0f}")
        t.add_row(name, *cells)
    return t


def merge_domains(res: list):
    """One seed's per-domain results as one row: domains side by side, mean score, best epochs joined."""
    merged = res[0]
    for r in res[1:]:
        merged.per_domain.update(r.per_domain)
        merged.seconds += r.seconds
    merged.best_score = sum(merged.per_domain.values()) / len(merged.per_domain)
    merged.best_epoch = "/".join(str(r.best_epoch) for r in res)
    return merged


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", default="pretrain,contrast,finetune")
    ap.add_argument("--pretrain", default="{}", help="JSON overrides for every pretrain setting")
    ap.add_argument("--contrast", default="{}", help="JSON overrides for every contrast setting")
    ap.add_argument("--finetune", default="{}", help="JSON overrides for every finetune setting")
    ap.add_argument("--pretrain-grid", default=None, help="JSON {name: PGE overrides}")
    ap.add_argument("--baseline-grid", default=None, help="JSON {name: baseline options incl. model}")
    ap.add_argument("--json", default=None, help="append one JSON line per (setting, seed) to this file")
    args = ap.parse_args()
    data = load_prepared(Path(args.data))
    seeds = [int(s) for s in args.seeds.split(",")]
    only = set(args.only.split(","))
    console = Console()
    run = Path(args.run)
    pre_kw, con_kw, ft_kw = (json.loads(x) for x in (args.pretrain, args.contrast, args.finetune))

    def log(section: str, name: str, results) -> None:
        if args.json:
            with open(args.json, "a") as f:
                for r in results:
                    row = {"section": section, "setting": name, "seed": r.seed, "best": r.best_score}
                    row.update(best_epoch=r.best_epoch, epochs_run=r.epochs_run, seconds=r.seconds)
                    f.write(json.dumps({**row, "per_domain": r.per_domain}) + "\n")

    grid = json.loads(args.pretrain_grid) if args.pretrain_grid else None
    if grid is None:
        grid = {opt: {"optimizer": opt} for opt in ("adam", "rowwise-adam", "rowwise-rmsprop")}
    if "pretrain" in only:
        rows = {}
        for name, kw in grid.items():
            t0 = time.time()
            cfg = PretrainConfig(**{**pre_kw, **kw})
            rows[name] = [pretrain.run_seed(cfg, data, run / name, s) for s in seeds]
            log("pretrain", name, rows[name])
            console.print(f"pretrain {name}: {time.time() - t0:.0f}s")
        console.print(table("PGE settings (valid NDCG@10, %)", rows, data.domains))
    if "baseline" in only and args.baseline_grid:
        rows = {}
        for name, kw in json.loads(args.baseline_grid).items():
            results = []
            for s in seeds:
                res = [baseline.run_domain(BaselineConfig(**kw), data, run / f"bl-{name}", s, d) for d in data.domains]
                results.append(merge_domains(res))
            rows[name] = results
            log("baseline", name, results)
        console.print(table("Single-domain baselines (valid NDCG@10, %)", rows, data.domains))
    base = run / next(iter(grid))
    if "contrast" in only:
        rows = {}
        for mode in ("none", "global", "individual"):
            for mask in ("row", "element") if mode != "none" else ("element",):
                kw = {"temperature": mode, "mask": mask, **con_kw}
                name = f"{mode}/{mask}" if mode != "none" else "none (AE)"
                sub = run / f"contrast-{mode}-{mask}"
                results = []
                for s in seeds:
                    # share the seed's PGE checkpoint
                    (sub / f"seed-{s}").mkdir(parents=True, exist_ok=True)
                    link = sub / f"seed-{s}" / "pretrain.safetensors"
                    if not link.exists():
                        link.symlink_to((base / f"seed-{s}" / "pretrain.safetensors").resolve())
                    results.append(contrast.run_seed(ContrastConfig(**kw), data, sub, s))
                rows[name] = results
                log("contrast", name, results)
                tau = [r.extra.get("tau_by_bucket") for r in results]
                console.print(f"contrast {name}: tau by bucket {tau[0]}")
        console.print(table("Contrast variants (valid NDCG@10, %)", rows, data.domains))
    if "finetune" in only:
        mask = con_kw.get("mask", "element")
        src = run / f"contrast-individual-{mask}"
        rows = {}
        grid = {
            "ae+tau (default)": {},
            "lora only": {"train_ae": False, "train_tau": False},
            "ae+tau+items": {"train_items": True},
            "no contrast term": {"contrast_weight": 0.0},
        }
        for name, kw in grid.items():
            results = []
            for s in seeds:
                res = [finetune.run_domain(FinetuneConfig(**{**kw, **ft_kw}), data, src, s, d) for d in data.domains]
                results.append(merge_domains(res))
            rows[name] = results
            log("finetune", name, results)
        console.print(table("Finetune options (valid NDCG@10, %)", rows, data.domains))


if __name__ == "__main__":
    main()
