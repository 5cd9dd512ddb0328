"""The common shape every raw reader returns.

A reader turns one source file into a :class:`RawDomain`: a Polars frame with
exactly the columns of :data:`RAW_SCHEMA`. ``line`` is the 1-based line (or
row) number in the source file; it orders interactions where there is no
timestamp and breaks timestamp ties, and it lets errors name the line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

RAW_SCHEMA: dict[str, pl.DataType] = {
    "user": pl.String(),
    "item": pl.String(),
    "rating": pl.Float64(),  # null where the source has no rating
    "ts": pl.Int64(),  # seconds (or any monotone integer); null where the source has none
    "line": pl.Int64(),
}


@dataclass
class RawDomain:
    """Interactions of one domain read from one source file."""

    name: str  # domain name, already normalised (lower-case, safe as a file-name part)
    frame: pl.DataFrame | pl.LazyFrame  # columns exactly RAW_SCHEMA
    path: Path | None = None  # the source file (None for generated data)
    meta: dict = field(default_factory=dict)  # e.g. {"format": "amazon-2014-csv"}
