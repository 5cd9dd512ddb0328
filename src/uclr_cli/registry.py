"""The one registry of model names: what evaluate, report, ablate and the baselines read.

Names are those of the paper's tables: the floors (Random, Pop), the
single-domain baselines of Table 2, and the ablation variants of Table 4.
"""

from __future__ import annotations

#: Floors scored on the same candidates in every evaluation (docs/design.md §4).
FLOORS: tuple[str, ...] = ("Random", "Pop")
#: Single-domain baselines: command-line kind -> display name (`uclr baseline <kind>`).
#: The cross-domain CAT-ART (Li et al. 2023), GA-MTCDR (Zhu et al. 2023) and HeroGraph (Cui et al. 2020) are scored
#: like them: one model per target domain.
BASELINES: dict[str, str] = {
    "bprmf": "BPRMF",
    "neumf": "NeuMF",
    "lightgcn": "LightGCN",
    "cat-art": "CAT-ART",
    "ga-mtcdr": "GA-MTCDR",
    "herograph": "HeroGraph",
}
#: Contrast variants -> the contrast checkpoint's temperature mode they come from.
CONTRAST_VARIANTS: dict[str, str] = {"PGE+AE": "none", "PGE+CL-AE": "global", "PGE+UCL-AE": "individual"}
#: The paper's ablation (Table 4), in order.
VARIANTS: tuple[str, ...] = ("PGE", *CONTRAST_VARIANTS, "UCLR")
#: The one order of models in every table, JSON payload and plot.
MODEL_ORDER: tuple[str, ...] = (*FLOORS, *BASELINES.values(), *VARIANTS)
#: Models a run folder can hold (everything but the floors).
TRAINED: tuple[str, ...] = (*BASELINES.values(), *VARIANTS)


def baseline_kind(display: str) -> str:
    """``"NeuMF"`` -> ``"neumf"``."""
    return next(k for k, v in BASELINES.items() if v == display)


def model_rank(name: str) -> tuple[int, str]:
    """Sort key: MODEL_ORDER first, unknown names after it by name."""
    return (MODEL_ORDER.index(name), "") if name in MODEL_ORDER else (len(MODEL_ORDER), name)


def block(model: str) -> int:
    """0 for a floor, 1 for a single-domain baseline, 2 for our variants (table rules between blocks)."""
    return 0 if model in FLOORS else 1 if model in BASELINES.values() else 2
