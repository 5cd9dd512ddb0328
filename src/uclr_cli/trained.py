"""The trained models of a run folder: each checkpoint loaded, checked, and turned into a scorer.

What evaluate scores (and anything that uses a trained model) reads from here:

* our variants (the paper's Table 4: PGE, PGE+AE, PGE+CL-AE, PGE+UCL-AE,
  UCLR) give per domain a user table and an item table whose dot products are
  the scores (:func:`vectors`);
* the single-domain baselines give one model per domain (:func:`baseline_models`),
  scored through :func:`rank_model`.

Every load checks the stage, the dataset fingerprint, the seed folder and the
checkpoints it was built from (``*_sha256``), and refuses a mismatch in one line.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from uclr_cli import checkpoint as ckpt
from uclr_cli import layout, registry
from uclr_cli.config import ContrastConfig
from uclr_cli.contrastive import TemperatureState
from uclr_cli.data.dataset import Dataset, sha256_file
from uclr_cli.errors import CheckpointError, DataError
from uclr_cli.metrics import default_chunk, positive_ranks, rank_candidates, summarize
from uclr_cli.models.autoencoder import AutoEncoder, load_ae
from uclr_cli.models.baselines import BPRMF, LightGCN, NeuMF, SingleDomainModel, normalized_graph
from uclr_cli.models.lora import LoRAEmbedding


def load_pretrain(path: Path, data: Dataset) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """User and item tables of a PGE checkpoint, checked against the dataset."""
    t, meta = ckpt.load(path, stage="pretrain", fingerprint=data.fingerprint)
    users, items = t["user_emb"], t["item_emb"]
    if users.shape[0] != data.n_users or items.shape[0] != data.n_items:
        raise DataError("checkpoint shapes do not match the dataset", path)
    return users, items, meta


def load_contrast(path: Path, data: Dataset, pre_sha: str, device):
    """Autoencoder, temperature state, loss config and metadata of a contrast checkpoint."""
    t, meta = ckpt.load(path, stage="contrast", fingerprint=data.fingerprint, expect={"pretrain_sha256": pre_sha})
    ccfg = ContrastConfig(**meta["config"])
    ae = AutoEncoder(meta["dim"], meta["hidden"]).to(device)
    load_ae(ae, t)
    temps = TemperatureState(data.n_users, ccfg, device)
    temps.load(t)
    return ae, temps, ccfg, meta


def load_finetuned(seed_dir: Path, data: Dataset, domain: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """User representations Dec(Enc(W)) and the item table of a finetuned domain."""
    d = data.domain_index(domain)
    pre_path, con_path = seed_dir / layout.PRETRAIN, seed_dir / layout.CONTRAST["individual"]
    users_e, items_e, _ = load_pretrain(pre_path, data)
    pre_sha, con_sha = sha256_file(pre_path), sha256_file(con_path)
    ae, _, _, _ = load_contrast(con_path, data, pre_sha, device)
    t, meta = ckpt.load(
        seed_dir / layout.finetune_name(domain),
        stage="finetune",
        fingerprint=data.fingerprint,
        expect={"contrast_sha256": con_sha, "domain": domain},
    )
    lora = LoRAEmbedding(users_e, meta["rank"], meta["config"]["lora_alpha"] or float(meta["rank"])).to(device)
    with torch.no_grad():
        lora.lora_a.copy_(t["lora_a"])
        lora.lora_b.copy_(t["lora_b"])
    if any(k.startswith("ae.") for k in t):
        load_ae(ae, t)
    items = items_e.to(device).clone()
    if "domain_items" in t:
        lo, hi = data.item_offsets[d], data.item_offsets[d + 1]
        items[lo:hi] = t["domain_items"].to(device)
    with torch.no_grad():
        return ae(lora.weight()), items


def available(seed_dir: Path, data: Dataset) -> list[str]:
    """Models with a checkpoint in ``seed_dir``, in registry order (UCLR and baselines: any domain)."""
    seed_dir = Path(seed_dir)
    for p in seed_dir.iterdir():  # a checkpoint behind a link that leads nowhere is refused, not skipped
        if p.name.endswith(".safetensors"):
            layout.check_link(p)
    out = [
        name
        for kind, name in registry.BASELINES.items()
        if any((seed_dir / layout.baseline_name(kind, d)).is_file() for d in data.domains)
    ]
    if (seed_dir / layout.PRETRAIN).is_file():
        out.append("PGE")
    for name, mode in registry.CONTRAST_VARIANTS.items():
        if (seed_dir / layout.CONTRAST[mode]).is_file():
            out.append(name)
    if any((seed_dir / layout.finetune_name(d)).is_file() for d in data.domains):
        out.append("UCLR")
    return out


def vectors(seed_dir: Path, variant: str, data: Dataset, device: torch.device) -> dict[str, tuple]:
    """Per domain: (user table, item table) of ``variant``; checks every checkpoint it reads."""
    seed_dir = Path(seed_dir)
    if variant == "UCLR":
        return {
            d: load_finetuned(seed_dir, data, d, device)
            for d in data.domains
            if (seed_dir / layout.finetune_name(d)).is_file()
        }
    users, items, _ = load_pretrain(seed_dir / layout.PRETRAIN, data)
    users, items = users.to(device), items.to(device)
    if variant == "PGE":
        return {d: (users, items) for d in data.domains}
    if variant in registry.CONTRAST_VARIANTS:
        path = seed_dir / layout.CONTRAST[registry.CONTRAST_VARIANTS[variant]]
        ae, _, _, _ = load_contrast(path, data, sha256_file(seed_dir / layout.PRETRAIN), device)
        with torch.no_grad():
            rep = ae(users)
        return {d: (rep, items) for d in data.domains}
    raise ValueError(f"unknown variant {variant!r}")


# --- single-domain baselines ---------------------------------------------------------------------------------


def domain_graph(data: Dataset, d: int, device) -> torch.Tensor:
    """LightGCN's normalised user-item graph of domain ``d``'s train interactions, on ``device``."""
    lo, hi = data.item_offsets[d], data.item_offsets[d + 1]
    sel = data.train_domain == d
    return normalized_graph(
        data.train_user[sel].to(device), data.train_item[sel].to(device) - lo, data.n_users, hi - lo
    )


def build_baseline(
    kind: str, conf: dict, data: Dataset, d: int, device, gen: torch.Generator | None = None
) -> SingleDomainModel:
    """A fresh model of ``kind`` for domain ``d`` from its recorded config (initialised from ``gen``)."""
    lo, hi = data.item_offsets[d], data.item_offsets[d + 1]
    shape = (data.n_users, hi - lo, lo, conf["dim"])
    if gen is None:
        gen = torch.Generator().manual_seed(0)
    if kind == "bprmf":
        model = BPRMF(*shape, init_std=conf["init_std"], gen=gen)
    elif kind in ("neumf", "gmf", "mlp"):
        model = NeuMF(*shape, conf.get("mlp_layers", [1]), kind=kind, init_std=conf["init_std"], gen=gen)
    elif kind == "lightgcn":
        model = LightGCN(*shape, conf["layers"], domain_graph(data, d, device), init_std=conf["init_std"], gen=gen)
    else:
        raise ValueError(f"unknown baseline {kind!r}")
    return model.to(device)


def load_baseline(seed_dir: Path, kind: str, data: Dataset, domain: str, device) -> SingleDomainModel:
    """The trained baseline ``kind`` of ``domain``, checked against the dataset, domain and shapes."""
    d = data.domain_index(domain)
    lo, hi = data.item_offsets[d], data.item_offsets[d + 1]
    path = Path(seed_dir) / layout.baseline_name(kind, domain)
    expect = {"domain": domain, "n_users": data.n_users, "item_offset": lo, "n_items": hi - lo}
    t, meta = ckpt.load(path, stage=f"baseline-{kind}", fingerprint=data.fingerprint, expect=expect)
    conf = meta.get("config")
    if not isinstance(conf, dict) or conf.get("dim") != meta.get("dim") or conf.get("model") != kind:
        raise CheckpointError("checkpoint metadata is inconsistent (config, dim or model)", path)
    model = build_baseline(kind, conf, data, d, device)
    try:
        model.load_tensors(t)
    except ValueError as e:
        raise CheckpointError(f"checkpoint does not match its model ({e})", path) from None
    model.eval()
    return model


def baseline_models(seed_dir: Path, display: str, data: Dataset, device) -> Iterator[tuple[str, SingleDomainModel]]:
    """(domain, model) of baseline ``display`` (e.g. "NeuMF") per domain it was trained on, one at a time."""
    kind = registry.baseline_kind(display)
    for d in data.domains:
        if (Path(seed_dir) / layout.baseline_name(kind, d)).is_file():
            yield d, load_baseline(seed_dir, kind, data, d, device)


@torch.no_grad()
def rank_model(
    model: SingleDomainModel, users: torch.Tensor, pos: torch.Tensor, negs: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Rank (R,) of each row's positive among its candidates under ``model`` (ties against it).

    Dot-product models go through :func:`uclr_cli.metrics.rank_candidates`
    (the fast path); others through their scorer, ``chunk`` rows at a time.
    """
    lo, hi = model.item_offset, model.item_offset + model.n_items
    if len(users) and (min(int(pos.min()), int(negs.min())) < lo or max(int(pos.max()), int(negs.max())) >= hi):
        raise DataError(f"candidates outside the model's domain items [{lo}, {hi})", "candidates")
    tables = model.tables()
    if tables is not None:
        u, it = tables
        return rank_candidates(u, it, users, pos - lo, negs - lo, chunk)
    fn = model.scorer()
    chunk = chunk or default_chunk(users.device)
    out = []
    for s in range(0, len(users), chunk):
        cand = torch.cat([pos[s : s + chunk].unsqueeze(1), negs[s : s + chunk]], dim=1)
        scores = fn(users[s : s + chunk], cand)
        out.append(positive_ranks(scores[:, 0], scores[:, 1:]))
    return torch.cat(out) if out else torch.empty((0,), dtype=torch.int64, device=users.device)


def baseline_valid_score(model: SingleDomainModel, data: Dataset, domain: str, k: int = 10) -> float:
    """NDCG@k on the domain's fixed validation candidates (NaN without rows)."""
    dev = next(model.parameters()).device
    ev = data.valid[domain].to(dev)
    if len(ev.users) == 0:
        return math.nan
    return float(summarize(rank_model(model, ev.users, ev.pos, ev.negs), [k])[("ndcg", k)])
