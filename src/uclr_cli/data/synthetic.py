"""Built-in synthetic multi-domain data with a known structure.

Users have one latent taste vector shared by every domain (plus a little
domain noise), so knowing a user in one domain helps in another: cross-domain
transfer is real. User activity and item popularity are Zipf-like, so some
users have one or two interactions in a domain and a few have hundreds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from uclr_cli.data.raw import RawDomain
from uclr_cli.errors import ConfigError


@dataclass(frozen=True)
class SyntheticSpec:
    users: int = 2000
    domains: tuple[str, ...] = ("books", "movies", "music")
    items: tuple[int, ...] = (800, 500, 600)
    interactions: tuple[int, ...] = (40000, 30000, 25000)
    factors: int = 8
    activity_zipf: float = 0.7  # exponent of the user-activity power law
    popularity_zipf: float = 0.5  # exponent of the item-popularity power law
    taste_strength: float = 8.0  # how much taste (vs popularity) decides the item
    domain_noise: float = 0.3  # per-domain deviation of a user's taste
    seed: int = 0


PRESETS: dict[str, SyntheticSpec] = {
    "default": SyntheticSpec(),
    "tiny": SyntheticSpec(users=300, items=(200, 150, 180), interactions=(6000, 4500, 3800)),
    # The paper's Amazon shape (Table 1).
    "amazon": SyntheticSpec(
        users=26507,
        domains=("books", "movies", "electronics"),
        items=(102800, 14912, 26933),
        interactions=(311539, 153361, 119342),
    ),
}


def check_spec(spec: SyntheticSpec) -> None:
    if spec.users < 2:
        raise ConfigError("need at least 2 users", "--users")
    if not (len(spec.domains) == len(spec.items) == len(spec.interactions)) or not spec.domains:
        raise ConfigError("--domains, --items and --interactions must have the same length", "--items")
    for name, n_items, n_int in zip(spec.domains, spec.items, spec.interactions):
        if n_items < 2:
            raise ConfigError(f"domain '{name}' needs at least 2 items", "--items")
        if n_int < spec.users:
            raise ConfigError(
                f"domain '{name}': {n_int} interactions cannot give each of {spec.users} users one", "--interactions"
            )


def _zipf_weights(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return rng.permutation(w / w.sum())


def generate(spec: SyntheticSpec) -> list[RawDomain]:
    """Generate one RawDomain per domain; every user has >= 1 interaction in every domain."""
    check_spec(spec)
    rng = np.random.default_rng(spec.seed)
    taste = rng.standard_normal((spec.users, spec.factors)) / np.sqrt(spec.factors)
    activity = _zipf_weights(spec.users, spec.activity_zipf, rng)
    out = []
    for name, n_items, n_int in zip(spec.domains, spec.items, spec.interactions):
        u_taste = taste + spec.domain_noise * rng.standard_normal(taste.shape) / np.sqrt(spec.factors)
        item_f = rng.standard_normal((n_items, spec.factors))
        pop = _zipf_weights(n_items, spec.popularity_zipf, rng)
        # Activity is shared across domains but jittered, so a heavy reader may be a light listener.
        act = activity * rng.lognormal(0.0, 0.5, spec.users)
        counts = 1 + rng.multinomial(n_int - spec.users, act / act.sum())
        users = np.repeat(np.arange(spec.users), counts)
        # Sampling-importance-resampling: propose items by popularity, keep one by taste.
        n_prop = 32
        prop = rng.choice(n_items, size=(len(users), n_prop), p=pop)
        chunk = 65536
        chosen = np.empty(len(users), dtype=np.int64)
        for s in range(0, len(users), chunk):  # chunks of interactions, bounded memory
            uu = users[s : s + chunk]
            pp = prop[s : s + chunk]
            logits = spec.taste_strength * np.einsum("bf,bkf->bk", u_taste[uu], item_f[pp])
            g = rng.gumbel(size=logits.shape)
            chosen[s : s + chunk] = pp[np.arange(len(uu)), np.argmax(logits + g, axis=1)]
        ts = 1_400_000_000 + rng.integers(0, 200_000_000, size=len(users))
        frame = pl.DataFrame(
            {
                "user": pl.Series([f"u{i:06d}" for i in range(spec.users)]).gather(users),
                "item": pl.Series([f"{name[:2]}{j:06d}" for j in range(n_items)]).gather(chosen),
                "rating": pl.Series(rng.integers(1, 6, size=len(users)).astype(np.float64)),
                "ts": pl.Series(ts, dtype=pl.Int64),
                "line": pl.Series(np.arange(1, len(users) + 1), dtype=pl.Int64),
            }
        )
        out.append(RawDomain(name=name, frame=frame, path=None, meta={"format": "synthetic"}))
    return out
