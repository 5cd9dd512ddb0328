"""Statistics of a prepared folder: the manifest's table and interactions per user (`uclr stats`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from uclr_cli.data.dataset import Dataset


@dataclass
class DataStats:
    """Statistics of a prepared folder: the manifest's table and interactions per user."""

    manifest: dict
    #: per domain: (U,) interactions per user held in the folder (train + valid + test rows)
    per_user: dict[str, np.ndarray]

    def histogram(self, domain: str) -> tuple[np.ndarray, np.ndarray]:
        """(interaction counts, users with that count), counts >= 1 only (log-log friendly)."""
        values, users = np.unique(self.per_user[domain], return_counts=True)
        keep = values > 0
        return values[keep], users[keep]


def stats(data: Dataset) -> DataStats:
    """The prepared data's statistics (``manifest["stats"]``) and per-domain interactions per user."""
    per_user = {}
    for di, d in enumerate(data.domains):
        total = data.train_counts[di].clone()
        for ev in (data.valid[d], data.test[d]):
            total += torch.bincount(ev.users, minlength=data.n_users)
        per_user[d] = total.numpy()
    return DataStats(manifest=_buckets_in_order(data.manifest), per_user=per_user)


def _bucket_lower(label: str) -> int:
    return int(label.split("-")[0].rstrip("+"))


def _buckets_in_order(manifest: dict) -> dict:
    """A copy of the manifest whose per-domain bucket dicts run by lower edge.

    manifest.json is written with sorted keys, so '21+' would come before '3-5'.
    """
    out = dict(manifest)
    out["stats"] = [
        {**s, "buckets": dict(sorted(s["buckets"].items(), key=lambda kv: _bucket_lower(kv[0])))}
        for s in manifest.get("stats", [])
    ]
    return out
