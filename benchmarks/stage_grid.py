"""Validation NDCG@10 of contrast and finetune settings on top of given PGE checkpoints (model selection only).

    python benchmarks/stage_grid.py --data data/douban --pretrain-run RUN --run OUT --seeds 0,1,2 \
        --contrast-grid '{"name": {options}}' [--finetune-grid '{"name": {options}}'] --json out.jsonl

Each contrast setting runs per seed on the seed's PGE checkpoint of ``--pretrain-run`` (linked, not copied);
each finetune setting runs on every domain on top of the first contrast setting with temperature individual.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from uclr_cli import layout
from uclr_cli.config import ContrastConfig, FinetuneConfig
from uclr_cli.data.dataset import load_prepared
from uclr_cli.stages import contrast, finetune


def link_pretrain(src: Path, dst: Path, seed: int) -> None:
    sd = layout.seed_dir(dst, seed)
    sd.mkdir(parents=True, exist_ok=True)
    link = sd / layout.PRETRAIN
    if not link.exists():
        link.symlink_to((layout.seed_dir(src, seed) / layout.PRETRAIN).resolve())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--pretrain-run", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--contrast-grid", default='{"default": {}}')
    ap.add_argument("--finetune-grid", default=None)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    data = load_prepared(Path(args.data))
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.run)

    def log(section, name, r) -> None:
        row = {"section": section, "setting": name, "seed": r.seed, "best": r.best_score, "best_epoch": r.best_epoch}
        row.update(epochs_run=r.epochs_run, seconds=r.seconds, per_domain=r.per_domain)
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")

    first = None
    for name, kw in json.loads(args.contrast_grid).items():
        scores = []
        for s in seeds:
            link_pretrain(Path(args.pretrain_run), out / f"c-{name}", s)
            r = contrast.run_seed(ContrastConfig(device="cpu", **kw), data, out / f"c-{name}", s)
            log("contrast", name, r)
            scores.append(r.best_score)
        first = first or (name if kw.get("temperature", "individual") == "individual" else None)
        print(f"contrast {name}: {100 * statistics.mean(scores):.2f}", flush=True)
    for name, kw in json.loads(args.finetune_grid or "{}").items():
        scores = []
        for s in seeds:
            for d in data.domains:  # one line per (seed, domain): its best epoch says whether finetuning helped
                r = finetune.run_domain(FinetuneConfig(device="cpu", **kw), data, out / f"c-{first}", s, d)
                log("finetune", name, r)
                scores.append(r.best_score)
        print(f"finetune {name}: {100 * statistics.mean(scores):.2f}", flush=True)


if __name__ == "__main__":
    main()
