"""What carries CAT-ART's scores: each part of ART's user vector scored alone, for warm and target-cold users.

    python benchmarks/cat_art_parts.py data/douban RUN [--seeds 0,1,2] [--split test]

ART's user vector is q + g + att (``ART.parts``): the target row q = U_t[u] (the pad for a user without train
rows in the target), g = Linear(Enc(x_u)) and the attention over the source rows. For every domain this prints
NDCG@10 (%) of the full vector and of each part alone on the split's fixed candidates, and the parts' mean
norms, for users with and without train rows in the domain ("cold"), mean over the seeds. A diagnosis, not a
model choice: nothing is tuned from it.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from uclr_cli.data.dataset import load_prepared
from uclr_cli.metrics import rank_candidates, summarize
from uclr_cli.trained import load_baseline


@torch.no_grad()
def parts_table(data, run: Path, seeds: list[int], split: str) -> list[tuple]:
    rows = []
    for dom in data.domains:
        d, lo = data.domain_index(dom), data.item_offsets[data.domain_index(dom)]
        ev = getattr(data, split)[dom]
        found: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for s in seeds:
            m = load_baseline(run / f"seed-{s}", "cat-art", data, dom, "cpu")
            q, g, att = m.parts(torch.arange(data.n_users))
            vecs = {"full": m.user_vectors(torch.arange(data.n_users))[0], "q": q, "g": g}
            if att is not None:
                vecs |= {"att": att, "g+att": g + att}
            cold = ~m.has[d]
            for who, users in (("warm", ~cold), ("cold", cold)):
                sel = users[ev.users]
                for name, u in vecs.items():
                    r = rank_candidates(u, m.items, ev.users[sel], ev.pos[sel] - lo, ev.negs[sel] - lo)
                    ndcg = 100 * summarize(r, [10])[("ndcg", 10)]
                    norm = float(u[users].norm(dim=1).mean()) if users.any() else float("nan")
                    found.setdefault((who, name), []).append((ndcg, norm))
        for (who, name), v in found.items():
            rows.append((dom, who, name, statistics.mean(x[0] for x in v), statistics.mean(x[1] for x in v)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path)
    ap.add_argument("run", type=Path)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--split", choices=("valid", "test"), default="test")
    a = ap.parse_args()
    data = load_prepared(a.data)
    seeds = [int(s) for s in a.seeds.split(",")]
    print(f"{a.run}, seeds {seeds}, {a.split}: NDCG@10 (%) of each part alone, and its mean norm")
    print(f"{'domain':<10} {'users':<6} {'part':<6} {'NDCG@10':>8} {'norm':>7}")
    for dom, who, name, ndcg, norm in parts_table(data, a.run, seeds, a.split):
        print(f"{dom:<10} {who:<6} {name:<6} {ndcg:8.2f} {norm:7.3f}")


if __name__ == "__main__":
    main()
