"""The one place that builds Rich tables and JSON payloads for results."""

from __future__ import annotations

from rich.table import Table

from uclr_cli import registry


def prepare_table(manifest: dict) -> list[Table]:
    """Per-domain counts and the activity histogram (users by train interactions)."""
    stats = manifest["stats"]
    t = Table(
        title=(
            f"prepared '{manifest['name']}': {manifest['n_users']:,} users in every domain, "
            f"{manifest['n_items']:,} items"
        )
    )
    for col in ("domain", "users", "items", "train", "valid", "test", "per user min/median/max"):
        t.add_column(col, justify="left" if col == "domain" else "right")
    for s in stats:
        t.add_row(
            s["domain"],
            f"{s['users']:,}",
            f"{s['items']:,}",
            f"{s['train']:,}",
            f"{s['valid']:,}",
            f"{s['test']:,}",
            f"{s['per_user_min']} / {s['per_user_median']:g} / {s['per_user_max']}",
        )
    # manifest.json is written with sorted keys: order buckets by their lower edge
    labels = sorted(stats[0]["buckets"], key=lambda lab: int(lab.split("-")[0].rstrip("+"))) if stats else []
    h = Table(title="users by train interactions per domain")
    h.add_column("domain")
    for lab in labels:
        h.add_column(lab, justify="right")
    h.add_column("left out of valid/test", justify="right")
    for s in stats:
        h.add_row(s["domain"], *(f"{s['buckets'][lab]:,}" for lab in labels), f"{s['excluded_users']:,}")
    return [t, h]


def prepare_json(manifest: dict) -> dict:
    return {
        "name": manifest["name"],
        "fingerprint": manifest["fingerprint"],
        "n_users": manifest["n_users"],
        "n_items": manifest["n_items"],
        "domains": manifest["stats"],
    }


# --------------------------------------------------------------------------- evaluate / stats

_METRIC_LABEL = {"mrr": "MRR", "hr": "HR", "ndcg": "NDCG"}
PLOT_HINT = "--plot needs matplotlib (pip install 'uclr-cli[plot]')"


def format_cell(mean: float, std: float | None) -> str:
    """``12.34 ± 0.56`` in percent, 2 decimals; no ± part for a single seed."""
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _eval_index(report) -> tuple[dict, dict]:
    """{(domain, model, bucket, metric, k): row} and {(domain, bucket, metric, k): best mean}."""
    cells, best = {}, {}
    for r in report.rows:
        cells[(r.domain, r.model, r.bucket, r.metric, r.k)] = r
        key = (r.domain, r.bucket, r.metric, r.k)
        best[key] = max(best.get(key, float("-inf")), r.mean)
    return cells, best


def _eval_columns(report) -> list[tuple[str, int]]:
    return [(m, k) for k in report.ks for m in _METRIC_LABEL]


def _seeds_text(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _eval_metric_cells(cells, best, domain, model, bucket, cols) -> list[str]:
    out = []
    for metric, k in cols:
        r = cells.get((domain, model, bucket, metric, k))
        if r is None:
            out.append("-")
            continue
        text = format_cell(r.mean, r.std)
        out.append(f"[bold]{text}[/]" if r.mean == best[(domain, bucket, metric, k)] else text)
    return out


PROTOCOL_TEXT = {
    "sampled": "sampled protocol: the positive against its 99 fixed negatives",
    "full": "full protocol: the positive against every item the user did not interact with",
}


def by_protocol(report) -> list[tuple[str, object]]:
    """(protocol, the report restricted to its rows) for each protocol of the report, in order."""
    protocols = list(dict.fromkeys(getattr(r, "protocol", "sampled") for r in report.rows)) or ["sampled"]
    return [(p, report.model_copy(update={"rows": [r for r in report.rows if r.protocol == p]})) for p in protocols]


def eval_tables(report, by_activity: bool = False, models: list[str] | None = None) -> list[Table]:
    """The results table (rows domain × model) and, with ``by_activity``, the per-bucket one, per protocol.

    Cells are ``mean ± std`` in percent over seeds; the best mean of each
    domain (and bucket) and column is bold. ``models`` gives the row order
    (default: the order of the report's rows).
    """
    tables = []
    for protocol, part in by_protocol(report):
        tables += _eval_tables(part, by_activity, models, PROTOCOL_TEXT.get(protocol, protocol))
    return tables


def _eval_tables(report, by_activity: bool, models: list[str] | None, protocol: str) -> list[Table]:
    cells, best = _eval_index(report)
    cols = _eval_columns(report)
    if models is None:
        models = list(dict.fromkeys(r.model for r in report.rows))
    domains = list(dict.fromkeys(r.domain for r in report.rows))
    n_seeds = {r.n_seeds for r in report.rows}
    uneven = len(n_seeds) > 1
    seeds_title = _seeds_text(len(report.seeds))
    t = Table(
        title=f"{report.split} of '{report.dataset}': mean ± std over {seeds_title} (%), best per domain in bold; "
        f"{protocol}",
    )
    t.add_column("domain (users)")
    t.add_column("model")
    if uneven:
        t.add_column("seeds", justify="right")
    for metric, k in cols:
        t.add_column(f"{_METRIC_LABEL[metric]}@{k}", justify="right")

    def seeds_cell(domain, model, bucket) -> list[str]:
        if not uneven:
            return []
        r = cells.get((domain, model, bucket, cols[0][0], cols[0][1]))
        return [str(r.n_seeds) if r else "-"]

    for i, d in enumerate(domains):
        present = [m for m in models if (d, m, "all", cols[0][0], cols[0][1]) in cells]
        if not present:
            continue
        if i:
            t.add_section()
        n_users = cells[(d, present[0], "all", cols[0][0], cols[0][1])].n_users
        for j, m in enumerate(present):
            first = f"{d} ({n_users:,})" if j == 0 else ""
            # a rule between the blocks of Table 2: floors | single-domain baselines | ours
            end = j + 1 < len(present) and registry.block(present[j + 1]) != registry.block(m)
            t.add_row(
                first, m, *seeds_cell(d, m, "all"), *_eval_metric_cells(cells, best, d, m, "all", cols), end_section=end
            )
    tables = [t]
    if by_activity:
        a = Table(
            title=f"{report.split} of '{report.dataset}' by activity (users by train interactions in the domain): "
            f"mean ± std over {seeds_title} (%), best per bucket in bold; {protocol}",
        )
        a.add_column("domain")
        a.add_column("bucket (users)")
        a.add_column("model")
        if uneven:
            a.add_column("seeds", justify="right")
        for metric, k in cols:
            a.add_column(f"{_METRIC_LABEL[metric]}@{k}", justify="right")
        first_group = True
        for d in domains:
            for b in report.buckets:
                present = [m for m in models if (d, m, b, cols[0][0], cols[0][1]) in cells]
                if not present:
                    continue
                if not first_group:
                    a.add_section()
                first_group = False
                n_users = cells[(d, present[0], b, cols[0][0], cols[0][1])].n_users
                for i, m in enumerate(present):
                    a.add_row(
                        d if i == 0 else "",
                        f"{b} ({n_users:,})" if i == 0 else "",
                        m,
                        *seeds_cell(d, m, b),
                        *_eval_metric_cells(cells, best, d, m, b, cols),
                    )
        tables.append(a)
    return tables


def eval_json(report) -> str:
    """The EvalReport payload as indented JSON (schema in docs/evaluate-json.md)."""
    return report.model_dump_json(indent=2)


def require_matplotlib(option: str = "--plot"):
    """The ``matplotlib.figure`` module, or a ConfigError naming ``option`` when it is missing."""
    from uclr_cli.errors import ConfigError

    try:
        import matplotlib.figure  # pyplot is never used: no global backend state
    except ImportError:
        raise ConfigError(PLOT_HINT, option) from None
    return matplotlib.figure


def _save_figure(fig, path) -> None:
    """Write a PNG atomically (a disk error is a one-line error naming the file)."""
    from uclr_cli.files import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"), "plot")


def eval_plot(report, path, models: list[str] | None = None) -> None:
    """Grouped bars per domain: NDCG@(first K) of each model per activity bucket, ± std over seeds."""
    figure = require_matplotlib()
    k = report.ks[0]
    report = by_protocol(report)[0][1]  # one protocol per figure: the first
    cells, _ = _eval_index(report)
    if models is None:
        models = list(dict.fromkeys(r.model for r in report.rows))
    domains = list(dict.fromkeys(r.domain for r in report.rows))
    groups = ["all", *report.buckets]
    fig = figure.Figure(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(models)) / 3), 3.2 * len(domains)))
    axes = fig.subplots(len(domains), 1, squeeze=False)[:, 0]
    width = 0.8 / max(1, len(models))
    for ax, d in zip(axes, domains):
        for i, m in enumerate(models):
            xs, ys, es = [], [], []
            for g, b in enumerate(groups):
                r = cells.get((d, m, b, "ndcg", k))
                if r is None:
                    continue
                xs.append(g - 0.4 + width * (i + 0.5))
                ys.append(r.mean)
                es.append(r.std or 0.0)
            if xs:  # error bars stop at 0: a metric cannot be negative
                ax.bar(xs, ys, width, yerr=[[min(e, y) for e, y in zip(es, ys)], es], capsize=2, label=m)
        labels = []
        for b in groups:
            r = next((cells[key] for key in cells if key[0] == d and key[2] == b), None)
            labels.append(f"{b}\n({r.n_users:,})" if r else b)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(labels)
        ax.set_ylabel(f"NDCG@{k} (%)")
        ax.set_title(f"{d}: users by train interactions ({report.split}, {_seeds_text(len(report.seeds))})")
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=max(1, len(names)), fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    _save_figure(fig, path)


def stats_json(manifest: dict, histograms: dict) -> dict:
    """prepare_json plus, per domain, ``[[interactions, users], ...]`` of interactions per user."""
    out = prepare_json(manifest)
    out["interactions_per_user"] = {
        d: [[int(v), int(n)] for v, n in zip(values, users)] for d, (values, users) in histograms.items()
    }
    return out


def stats_plot(name: str, histograms: dict, path) -> None:
    """Per-domain histograms of interactions per user on log-log axes (the paper's Figs 3-4)."""
    figure = require_matplotlib()
    domains = list(histograms)
    fig = figure.Figure(figsize=(4.0 * len(domains), 3.4))
    axes = fig.subplots(1, len(domains), squeeze=False)[0]
    for ax, d in zip(axes, domains):
        values, users = histograms[d]
        ax.scatter(values, users, s=10)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("interactions per user")
        ax.set_ylabel("users")
        ax.set_title(d)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"'{name}': interactions per user")
    fig.tight_layout()
    _save_figure(fig, path)
