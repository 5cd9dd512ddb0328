"""The one place that builds Rich tables and JSON payloads for results."""

from __future__ import annotations

from rich.table import Table


def prepare_table(manifest: dict) -> list[Table]:
    """Per-domain counts and the activity histogram (users by train interactions)."""
    stats = manifest["stats"]
    t = Table(title=f"prepared '{manifest['name']}': {manifest['n_users']:,} users in every domain, {manifest['n_items']:,} items")
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
    labels = list(stats[0]["buckets"]) if stats else []
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
