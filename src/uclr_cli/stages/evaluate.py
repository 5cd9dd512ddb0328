"""Evaluate every model of a run folder on the fixed candidates, or on the whole catalogue (docs/design.md §4).

For each ``seed-*`` folder and each variant it holds (see
:mod:`uclr_cli.trained`), every domain's candidates of one split are
ranked with :func:`uclr_cli.metrics.rank_candidates`; two floors are scored on
the same candidates: ``Random`` (one random score per candidate, from a
generator seeded by the seed) and ``Pop`` (items scored by their number of
train interactions). Per-row metrics are averaged per seed, domain, model and
activity bucket, then mean and sample std over seeds are taken.

Two protocols (``protocols``): ``sampled`` ranks the positive among its 99
fixed negatives; ``full`` ranks it among every item of the domain the user did
not interact with in train (on the test split the user's valid item is left
out too), with :func:`uclr_cli.catalogue.full_ranks`, chunk by chunk. Under
``full`` the Random floor draws the positive's rank uniformly from 1..N (N =
the row's candidates), which is the law of its rank under one i.i.d. random
score per item (ties have probability 0), from a generator seeded by the seed
and domain: the same kind of floor as under ``sampled``, without drawing
users x items numbers.

Plain functions: nothing here prints or exits; progress goes through a callback.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import torch
from pydantic import BaseModel, ConfigDict, Field

from uclr_cli import catalogue, layout, loop, registry, trained
from uclr_cli.data.dataset import Dataset, EvalSplit
from uclr_cli.data.split import DEFAULT_BUCKETS, bucket_index, bucket_labels
from uclr_cli.errors import ConfigError, DataError
from uclr_cli.files import atomic_write
from uclr_cli.metrics import METRIC_NAMES, metrics_from_ranks, positive_ranks, rank_candidates

#: Label of the bucket holding every evaluated user.
ALL_BUCKET = "all"
#: Stream of the Random floor's generator (see ``loop.generator``); one per domain above it.
RANDOM_STREAM = 9_000
#: Stream of the Random floor under the full protocol (one per domain above it).
RANDOM_FULL_STREAM = 9_500
#: Version of the JSON payload and per-seed parquet (2: rows carry ``protocol``).
SCHEMA_VERSION = 2
PROTOCOLS = ("sampled", "full")

PER_SEED_SCHEMA = {
    "protocol": pl.String,
    "domain": pl.String,
    "model": pl.String,
    "seed": pl.Int64,
    "bucket": pl.String,
    "metric": pl.String,
    "k": pl.Int64,
    "value": pl.Float64,
    "n_users": pl.Int64,
}


class EvalRow(BaseModel):
    """One cell of the results: a metric of a model in a domain and user bucket, over seeds."""

    model_config = ConfigDict(extra="forbid")

    protocol: Literal["sampled", "full"] = Field(
        "sampled",
        description="'sampled': the positive against its 99 fixed negatives; 'full': against every item of the "
        "domain the user did not interact with in train (and, on test, not the valid item).",
    )
    domain: str = Field(description="Domain name, as in the prepared folder's manifest.")
    model: str = Field(description="Random, Pop, PGE, PGE+AE, PGE+CL-AE, PGE+UCL-AE or UCLR.")
    bucket: str = Field(
        description="'all', or an activity bucket label such as '1-2' (users by train interactions in this domain)."
    )
    metric: Literal["mrr", "hr", "ndcg"] = Field(description="Metric name; see docs/evaluate-json.md.")
    k: int = Field(description="Cut-off K.")
    mean: float = Field(description="Mean over seeds of the per-seed average over users, in percent (0-100).")
    std: float | None = Field(
        description="Sample standard deviation over seeds (ddof=1), in percent; null with a single seed."
    )
    n_seeds: int = Field(description="Number of seeds averaged.")
    n_users: int = Field(description="Evaluation rows (one per user) in this domain and bucket.")
    n_candidates: float | None = Field(
        None, description="Mean number of items each positive is ranked among (100 under 'sampled')."
    )


class EvalReport(BaseModel):
    """The JSON payload of `uclr evaluate --json` (schema: docs/evaluate-json.md)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this payload (2: rows carry 'protocol').")
    dataset: str = Field(description="Name of the prepared dataset.")
    fingerprint: str = Field(description="Fingerprint (sha256) of the prepared dataset.")
    split: Literal["test", "valid"] = Field(description="Which fixed candidates were scored.")
    protocols: list[Literal["sampled", "full"]] = Field(
        default_factory=lambda: ["sampled"], description="Protocols evaluated, in the order of the rows."
    )
    seeds: list[int] = Field(description="Seeds evaluated (seed-<s> folders with at least one checkpoint).")
    ks: list[int] = Field(description="Cut-offs K.")
    buckets: list[str] = Field(description="Activity bucket labels, in order (the 'all' bucket is not listed).")
    rows: list[EvalRow] = Field(
        description="Ordered by protocol, domain, model, bucket ('all' first), metric (mrr, hr, ndcg), k."
    )


@dataclass
class EvalResult:
    """What :func:`run` returns: the aggregated report, per-seed rows and notes."""

    report: EvalReport
    per_seed: pl.DataFrame  # columns PER_SEED_SCHEMA, values in percent
    models: list[str]  # models evaluated, in registry.MODEL_ORDER
    warnings: list[str] = field(default_factory=list)


def check_ks(ks: Sequence[int]) -> list[int]:
    out: list[int] = []
    for k in ks:
        k = int(k)
        if k < 1:
            raise ConfigError(f"cut-offs must be >= 1; got {k}", "--k")
        if k not in out:
            out.append(k)
    if not out:
        raise ConfigError("at least one cut-off is needed", "--k")
    return out


def check_buckets(edges: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(e) for e in edges)
    if not out or out[0] != 0:
        raise ConfigError("bucket edges must start at 0 (every user has >= 0 train interactions)", "--buckets")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ConfigError("bucket edges must be strictly increasing", "--buckets")
    return out


def pop_scores(data: Dataset) -> torch.Tensor:
    """(I,) float64: train interactions per item. Items live in one domain, so this is per domain too."""
    return torch.bincount(data.train_item, minlength=data.n_items).to(torch.float64)


def check_protocols(protocols: Sequence[str]) -> list[str]:
    out = list(dict.fromkeys(protocols))
    bad = [p for p in out if p not in PROTOCOLS]
    if bad or not out:
        raise ConfigError(
            f"protocol must be sampled, full or both (sampled,full); got {', '.join(bad) or 'none'}", "--protocol"
        )
    return out


def full_exclusions(data: Dataset, split: str, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per domain, the CSR of the items each user leaves out under ``full``: train items, and the valid item on test."""
    out = {}
    for di, d in enumerate(data.domains):
        lo, hi = data.item_offsets[di], data.item_offsets[di + 1]
        sel = data.train_domain == di
        users, items = data.train_user[sel], data.train_item[sel]
        if split == "test":
            users, items = torch.cat([users, data.valid[d].users]), torch.cat([items, data.valid[d].pos])
        out[d] = tuple(t.to(device) for t in catalogue.exclusion_csr(users, items - lo, data.n_users, hi - lo))
    return out


def random_full_ranks(n_cand: torch.Tensor, seed: int, domain_index: int) -> torch.Tensor:
    """Full-protocol Random floor: each row's rank uniform on 1..N (its law under i.i.d. random item scores)."""
    gen = loop.generator(torch.device("cpu"), seed, RANDOM_FULL_STREAM + domain_index)
    u = torch.rand(n_cand.shape, generator=gen, dtype=torch.float64)
    n = n_cand.cpu().to(torch.float64)
    return (1 + torch.floor(u * n)).clamp_(max=n).to(torch.int64)


def random_ranks(ev: EvalSplit, seed: int, domain_index: int) -> torch.Tensor:
    """Ranks under one uniform random score per candidate; reproducible per (seed, domain).

    Drawn on the CPU so the floor does not depend on the device.
    """
    r, n = ev.negs.shape
    gen = loop.generator(torch.device("cpu"), seed, RANDOM_STREAM + domain_index)
    scores = torch.rand((r, n + 1), generator=gen, dtype=torch.float64)
    return positive_ranks(scores[:, 0], scores[:, 1:])


def bucket_rows(
    ranks: torch.Tensor, bucket_of_row: torch.Tensor, n_buckets: int, ks: Sequence[int]
) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """Per metric: (sum per bucket (B,), rows per bucket (B,)), computed with one scatter each."""
    per_row = metrics_from_ranks(ranks.cpu(), ks)
    b = bucket_of_row.cpu()
    counts = torch.bincount(b, minlength=n_buckets)
    out = {}
    for key, v in per_row.items():
        sums = torch.zeros(n_buckets, dtype=torch.float64).index_add_(0, b, v)
        out[key] = (sums, counts)
    return out


def run(
    data: Dataset,
    run_dir: Path,
    *,
    split: str = "test",
    ks: Sequence[int] = (10, 20),
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    device: str = "auto",
    variants: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
    protocols: Sequence[str] = ("sampled",),
) -> EvalResult:
    """Score every seed and model of ``run_dir`` on ``split``; aggregate over seeds.

    ``protocols``: ``sampled`` (the fixed candidates), ``full`` (every item the
    user did not interact with), or both; rows carry their protocol.
    ``variants`` restricts the trained variants evaluated (the floors always are).
    ``progress`` receives one short line per (seed, model).
    """
    if split not in ("test", "valid"):
        raise ConfigError(f"split must be test or valid; got {split!r}", "--split")
    ks = check_ks(ks)
    protocols = check_protocols(protocols)
    edges = check_buckets(buckets)
    labels = bucket_labels(edges)
    if variants is not None:
        known = registry.TRAINED
        unknown = [v for v in variants if v not in known]
        if unknown:
            raise ConfigError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(known)}", "variants")
    dev = loop.resolve_device(device)
    run_dir = Path(run_dir)
    seeds = layout.find_seeds(run_dir)
    note = progress or (lambda _msg: None)
    warnings: list[str] = []

    # Which seeds hold what; a seed without any checkpoint is skipped (e.g. an interrupted run).
    plan: list[tuple[int, Path, list[str]]] = []
    for s, sdir in seeds:
        if (sdir / layout.dcp_name(layout.PRETRAIN)).is_dir():  # PGE's newest state is not in pretrain.safetensors
            warnings.append(
                f"{sdir}: an unfinished torchrun pretrain left {layout.dcp_name(layout.PRETRAIN)}; its PGE is "
                f"{'older' if (sdir / layout.PRETRAIN).is_file() else 'missing'} (`uclr consolidate` writes it)"
            )
        have = trained.available(sdir, data)
        if variants is not None:
            have = [v for v in have if v in variants]
        if not have:
            warnings.append(
                f"{sdir}: no checkpoint{' of the chosen variants' if variants is not None else ''}; seed {s} skipped"
            )
            continue
        plan.append((s, sdir, sorted(have, key=registry.model_rank)))
    if not plan:
        what = "of the chosen variants " if variants is not None else ""
        raise DataError(f"no checkpoint {what}in any seed-* folder (train first)", run_dir)

    all_seeds = [s for s, _, _ in plan]
    for v in sorted({v for _, _, have in plan for v in have}, key=registry.model_rank):
        with_v = [s for s, _, have in plan if v in have]
        if len(with_v) < len(all_seeds):
            warnings.append(
                f"{v}: checkpoints for seed(s) {', '.join(map(str, with_v))} only, of {', '.join(map(str, all_seeds))}"
            )

    splits = data.split(split)
    ev_dev = {d: splits[d].to(dev) for d in data.domains}
    # Activity bucket of every evaluation row, from the user's train interactions in that domain.
    row_bucket = {}
    for di, d in enumerate(data.domains):
        counts = data.train_counts[di][splits[d].users].numpy()
        row_bucket[d] = torch.from_numpy(bucket_index(counts, edges).astype(np.int64))
    n_b = len(edges)
    pop = pop_scores(data).unsqueeze(1).to(dev)  # (I, 1): score = popularity . 1
    ones = torch.ones((data.n_users, 1), dtype=torch.float64, device=dev)
    sampled, full = "sampled" in protocols, "full" in protocols
    if sampled:
        pop_ranks = {d: rank_candidates(ones, pop, ev.users, ev.pos, ev.negs) for d, ev in ev_dev.items()}
    if full:
        excl = full_exclusions(data, split, dev)
        lo_of = {d: data.item_offsets[di] for di, d in enumerate(data.domains)}
        n_of = {d: data.item_offsets[di + 1] - data.item_offsets[di] for di, d in enumerate(data.domains)}
        n_cand = {d: catalogue.n_candidates(ev_dev[d].users, n_of[d], excl[d]) for d in data.domains}

        def full_of(d: str, score: catalogue.ScoreFn, width: int = 1) -> torch.Tensor:
            ev = ev_dev[d]
            chunk = catalogue.full_chunk(n_of[d], dev, width)
            return catalogue.full_ranks(score, ev.users, ev.pos - lo_of[d], n_of[d], excl[d], chunk)

        pop_full = {d: full_of(d, catalogue.dot_scores(ones, pop[lo_of[d] : lo_of[d] + n_of[d]])) for d in data.domains}
    n_neg = {d: splits[d].negs.shape[1] for d in data.domains}

    cols: dict[str, list] = {c: [] for c in PER_SEED_SCHEMA}
    cand_mean: dict[tuple, float] = {}

    def add(protocol: str, domain: str, model: str, seed: int, ranks: torch.Tensor) -> None:
        if (protocol, domain) not in cand_mean:
            b = row_bucket[domain]
            nc = (
                n_cand[domain].cpu().double()
                if protocol == "full"
                else torch.full(b.shape, n_neg[domain] + 1.0, dtype=torch.float64)
            )
            sums = torch.zeros(n_b, dtype=torch.float64).index_add_(0, b, nc)
            cnt = torch.bincount(b, minlength=n_b)
            cand_mean[(protocol, domain, ALL_BUCKET)] = float(nc.mean()) if len(nc) else float("nan")
            for i in range(n_b):
                cand_mean[(protocol, domain, labels[i])] = float(sums[i] / cnt[i]) if cnt[i] else float("nan")
            cand_mean[(protocol, domain)] = 0.0
        per = bucket_rows(ranks, row_bucket[domain], n_b, ks)
        n_all = int(ranks.shape[0])
        for k in ks:
            for metric in METRIC_NAMES:
                sums, counts = per[(metric, k)]
                total = float(sums.sum())
                entries = [(ALL_BUCKET, total, n_all)] + [
                    (labels[b], float(sums[b]), int(counts[b])) for b in range(n_b)
                ]
                for label, s_val, n in entries:
                    if n == 0:  # nothing to average: the bucket (or domain) has no rows
                        continue
                    cols["protocol"].append(protocol)
                    cols["domain"].append(domain)
                    cols["model"].append(model)
                    cols["seed"].append(seed)
                    cols["bucket"].append(label)
                    cols["metric"].append(metric)
                    cols["k"].append(k)
                    cols["value"].append(100.0 * s_val / n)
                    cols["n_users"].append(n)

    for s, sdir, have in plan:
        note(f"seed {s}: Random, Pop")
        for di, d in enumerate(data.domains):
            if sampled:
                add("sampled", d, "Random", s, random_ranks(splits[d], s, di))
                add("sampled", d, "Pop", s, pop_ranks[d])
            if full:
                add("full", d, "Random", s, random_full_ranks(n_cand[d], s, di))
                add("full", d, "Pop", s, pop_full[d])
        for v in have:
            note(f"seed {s}: {v}")
            if v in registry.BASELINES.values():  # single-domain models: rows for the domains they were trained on
                for d, model in trained.baseline_models(sdir, v, data, dev):
                    ev = ev_dev[d]
                    if sampled:
                        add("sampled", d, v, s, trained.rank_model(model, ev.users, ev.pos, ev.negs))
                    if full:
                        dm = trained.as_domain_model(model, v, s, d, dev)
                        add("full", d, v, s, full_of(d, dm.score_all(), dm.width))
                continue
            tables = trained.vectors(sdir, v, data, dev)
            for d in data.domains:
                if d not in tables:
                    continue
                u, it = tables[d]
                ev = ev_dev[d]
                if sampled:
                    add("sampled", d, v, s, rank_candidates(u, it, ev.users, ev.pos, ev.negs))
                if full:
                    add("full", d, v, s, full_of(d, catalogue.dot_scores(u, it[lo_of[d] : lo_of[d] + n_of[d]])))
            del tables
        missing = [d for d in data.domains if "UCLR" in have and not (sdir / layout.finetune_name(d)).is_file()]
        if missing:
            warnings.append(f"{sdir}: UCLR not finetuned for {', '.join(missing)}; no UCLR rows there for seed {s}")

    per_seed = pl.DataFrame(cols, schema=PER_SEED_SCHEMA)
    report = _aggregate(data, split, all_seeds, ks, labels, per_seed, protocols, cand_mean)
    models = sorted({r.model for r in report.rows}, key=registry.model_rank)
    return EvalResult(report=report, per_seed=per_seed, models=models, warnings=warnings)


def _aggregate(
    data: Dataset,
    split: str,
    seeds: list[int],
    ks: list[int],
    labels: list[str],
    per_seed: pl.DataFrame,
    protocols: list[str],
    cand_mean: dict[tuple, float],
) -> EvalReport:
    groups: dict[tuple, list[float]] = {}
    users: dict[tuple, int] = {}
    for proto, dom, model, bucket, metric, k, value, n in per_seed.select(
        ["protocol", "domain", "model", "bucket", "metric", "k", "value", "n_users"]
    ).iter_rows():
        key = (proto, dom, model, bucket, metric, k)
        groups.setdefault(key, []).append(value)
        users[key] = n  # the same rows for every seed: candidates are fixed
    b_order = {b: i for i, b in enumerate([ALL_BUCKET, *labels])}

    def order(key):
        proto, dom, model, bucket, metric, k = key
        return (
            protocols.index(proto),
            data.domains.index(dom),
            registry.model_rank(model),
            b_order[bucket],
            METRIC_NAMES.index(metric),
            ks.index(k),
        )

    rows = []
    for key in sorted(groups, key=order):
        vals = groups[key]
        std = statistics.stdev(vals) if len(vals) > 1 else None
        proto, dom, model, bucket, metric, k = key
        rows.append(
            EvalRow(
                protocol=proto,
                domain=dom,
                model=model,
                bucket=bucket,
                metric=metric,
                k=k,
                mean=statistics.fmean(vals),
                std=std,
                n_seeds=len(vals),
                n_users=users[key],
                n_candidates=cand_mean.get((proto, dom, bucket)),
            )
        )
    return EvalReport(
        dataset=data.name,
        fingerprint=data.fingerprint,
        split=split,
        protocols=protocols,
        seeds=seeds,
        ks=ks,
        buckets=labels,
        rows=rows,
    )


def write_per_seed(per_seed: pl.DataFrame, path: Path) -> Path:
    """Write the per-seed rows to parquet: a temporary sibling renamed into place."""
    path = Path(path)
    atomic_write(path, lambda tmp: per_seed.write_parquet(tmp, compression="zstd"), "parquet", DataError)
    return path
