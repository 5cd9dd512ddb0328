"""The model variants a run folder can hold, and how each one scores users.

Names follow the paper's ablation (Table 4): PGE, PGE+AE, PGE+CL-AE,
PGE+UCL-AE and UCLR. Each variant gives, per domain, a user table and an
item table whose dot products are the scores.
"""

from __future__ import annotations

from pathlib import Path

import torch

from uclr_cli import checkpoint as ckpt
from uclr_cli.data.prepared import Dataset, sha256_file
from uclr_cli.models.autoencoder import AutoEncoder
from uclr_cli.stages import common

#: variant name -> the contrast checkpoint's temperature mode it comes from
CONTRAST_VARIANTS = {"PGE+AE": "none", "PGE+CL-AE": "global", "PGE+UCL-AE": "individual"}
VARIANTS = ("PGE", *CONTRAST_VARIANTS, "UCLR")


def available(seed_dir: Path, data: Dataset) -> list[str]:
    """Variants whose checkpoints exist in ``seed_dir`` (UCLR: every domain finetuned)."""
    out = []
    if (seed_dir / ckpt.PRETRAIN).is_file():
        out.append("PGE")
    for name, mode in CONTRAST_VARIANTS.items():
        if (seed_dir / ckpt.CONTRAST[mode]).is_file():
            out.append(name)
    if any((seed_dir / ckpt.finetune_name(d)).is_file() for d in data.domains):
        out.append("UCLR")
    return out


def vectors(
    seed_dir: Path, variant: str, data: Dataset, device: torch.device
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per domain: (user table, item table) of ``variant``; checks every checkpoint it reads."""
    seed_dir = Path(seed_dir)
    users, items, _ = common.load_pretrain(seed_dir / ckpt.PRETRAIN, data)
    users, items = users.to(device), items.to(device)
    if variant == "PGE":
        return {d: (users, items) for d in data.domains}
    if variant in CONTRAST_VARIANTS:
        path = seed_dir / ckpt.CONTRAST[CONTRAST_VARIANTS[variant]]
        t, meta = ckpt.load(
            path,
            stage="contrast",
            fingerprint=data.fingerprint,
            expect={"pretrain_sha256": sha256_file(seed_dir / ckpt.PRETRAIN)},
        )
        ae = AutoEncoder(meta["dim"], meta["hidden"]).to(device)
        ae.load_state_dict({k[3:]: v for k, v in t.items() if k.startswith("ae.")})
        with torch.no_grad():
            rep = ae(users)
        return {d: (rep, items) for d in data.domains}
    if variant == "UCLR":
        from uclr_cli.stages.finetune import load_finetuned

        return {
            d: load_finetuned(seed_dir, data, d, device)
            for d in data.domains
            if (seed_dir / ckpt.finetune_name(d)).is_file()
        }
    raise ValueError(f"unknown variant {variant!r}")
