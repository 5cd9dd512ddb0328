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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uclr_cli import catalogue, layout, registry
from uclr_cli import checkpoint as ckpt
from uclr_cli.config import ContrastConfig
from uclr_cli.contrastive import TemperatureState
from uclr_cli.data.dataset import Dataset, sha256_file
from uclr_cli.errors import CheckpointError, ConfigError, DataError
from uclr_cli.metrics import default_chunk, positive_ranks, rank_candidates, summarize
from uclr_cli.models.autoencoder import AutoEncoder, learned_columns, load_ae, with_fixed_column
from uclr_cli.models.baselines import BPRMF, LightGCN, NeuMF, SingleDomainModel, normalized_graph
from uclr_cli.models.cat_art import ART
from uclr_cli.models.ga_mtcdr import GATarget
from uclr_cli.models.herograph import HeroTarget
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
    try:
        load_ae(ae, t)
    except ValueError as e:
        raise CheckpointError(f"checkpoint does not match its model ({e})", path) from None
    temps = TemperatureState(data.n_users, ccfg, device)
    temps.load(t)
    return ae, temps, ccfg, meta


def load_finetuned(seed_dir: Path, data: Dataset, domain: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """User representations Dec(Enc(W)) and the item table of a finetuned domain."""
    d = data.domain_index(domain)
    pre_path, con_path = seed_dir / layout.PRETRAIN, seed_dir / layout.CONTRAST["individual"]
    users_e, items_e, pre_meta = load_pretrain(pre_path, data)
    fixed = bool(pre_meta.get("item_bias"))
    users_e = learned_columns(users_e, fixed)
    pre_sha, con_sha = sha256_file(pre_path), sha256_file(con_path)
    ae, _, _, _ = load_contrast(con_path, data, pre_sha, device)
    path = seed_dir / layout.finetune_name(domain)
    t, meta = ckpt.load(
        path, stage="finetune", fingerprint=data.fingerprint, expect={"contrast_sha256": con_sha, "domain": domain}
    )
    lo, hi = data.item_offsets[d], data.item_offsets[d + 1]
    try:
        rank = int(meta["rank"])
        lora = LoRAEmbedding(users_e, rank, meta["config"]["lora_alpha"] or float(rank)).to(device)
        want = {"lora_a": lora.lora_a.shape, "lora_b": lora.lora_b.shape}
        if "domain_items" in t:
            want["domain_items"] = (hi - lo, items_e.shape[1])
        for k, shape in want.items():
            if tuple(t[k].shape) != tuple(shape):
                raise ValueError(f"{k} has shape {tuple(t[k].shape)}, expected {tuple(shape)}")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint does not match its model ({e})", path) from None
    with torch.no_grad():
        lora.lora_a.copy_(t["lora_a"])
        lora.lora_b.copy_(t["lora_b"])
    if any(k.startswith("ae.") for k in t):
        try:
            load_ae(ae, t)
        except ValueError as e:
            raise CheckpointError(f"checkpoint does not match its model ({e})", path) from None
    items = items_e.to(device).clone()
    if "domain_items" in t:
        items[lo:hi] = t["domain_items"].to(device)
    with torch.no_grad():
        return with_fixed_column(ae(lora.weight()), fixed), items


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
    users, items, pre_meta = load_pretrain(seed_dir / layout.PRETRAIN, data)
    users, items = users.to(device), items.to(device)
    fixed = bool(pre_meta.get("item_bias"))
    if variant == "PGE":
        return {d: (users, items) for d in data.domains}
    if variant in registry.CONTRAST_VARIANTS:
        path = seed_dir / layout.CONTRAST[registry.CONTRAST_VARIANTS[variant]]
        ae, _, _, _ = load_contrast(path, data, sha256_file(seed_dir / layout.PRETRAIN), device)
        with torch.no_grad():
            rep = with_fixed_column(ae(learned_columns(users, fixed)), fixed)
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
    init = dict(init_std=conf.get("init_std", 0.1), gen=gen, init=conf.get("init", "normal"))  # older: normal
    if kind in ("bprmf", "cat-art-mf"):  # cat-art-mf: CAT-ART's stage 1
        model = BPRMF(*shape, item_bias=conf.get("item_bias", False), **init)
    elif kind == "cat-art":
        model = ART(*shape, len(data.domains), d, conf["dropout"], gen)
    elif kind == "ga-mtcdr":
        model = GATarget(*shape, len(data.domains), gen)
    elif kind == "herograph":  # the tables a checkpoint holds; nothing to initialise
        model = HeroTarget(*shape)
    elif kind in ("neumf", "gmf", "mlp"):
        model = NeuMF(*shape, conf.get("mlp_layers", [1]), kind=kind, **init)
    elif kind == "lightgcn":
        model = LightGCN(*shape, conf["layers"], domain_graph(data, d, device), **init)
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


# --- one model of one domain, for using it (recommend, export, full-catalogue evaluation) ----------------------


@dataclass
class DomainModel:
    """A trained model of one seed and domain, with what scores every item of the domain.

    ``users`` (U, m) and ``items`` (I_d, m, the domain's items in global index
    order) when scores are dot products ``users[u] · items[i]``; both None for
    a model with its own scorer (NeuMF), scored through ``pair_scorer``.
    """

    name: str
    seed: int
    domain: str
    item_offset: int
    n_items: int
    users: torch.Tensor | None
    items: torch.Tensor | None
    pair_scorer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    width: int = 1  # elements per (user, item) pair the scorer holds at once (chunk sizing)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_dot(self) -> bool:
        return self.users is not None

    def score_all(self) -> catalogue.ScoreFn:
        """``users (c,) -> (c, I_d)`` scores of every item of the domain."""
        if self.users is not None:
            return catalogue.dot_scores(self.users, self.items)
        lo, n, fn = self.item_offset, self.n_items, self.pair_scorer

        def score(users: torch.Tensor) -> torch.Tensor:
            cand = torch.arange(lo, lo + n, device=users.device).expand(len(users), n)
            return fn(users, cand)

        return score

    def chunk(self, device: torch.device) -> int:
        return catalogue.full_chunk(self.n_items, device, self.width)


def has_model(seed_dir: Path, name: str, data: Dataset, domain: str) -> bool:
    """Whether ``seed_dir`` holds what model ``name`` needs in ``domain``."""
    seed_dir = Path(seed_dir)
    if name in registry.BASELINES.values():
        return (seed_dir / layout.baseline_name(registry.baseline_kind(name), domain)).is_file()
    if name == "UCLR":
        return (seed_dir / layout.finetune_name(domain)).is_file()
    if name == "PGE":
        return (seed_dir / layout.PRETRAIN).is_file()
    if name in registry.CONTRAST_VARIANTS:
        return (seed_dir / layout.CONTRAST[registry.CONTRAST_VARIANTS[name]]).is_file()
    return False


def domain_model(seed_dir: Path, seed: int, name: str, data: Dataset, domain: str, device) -> DomainModel:
    """Load model ``name`` of ``seed_dir`` for ``domain`` (checked like every load)."""
    d = data.domain_index(domain)
    lo, hi = data.item_offsets[d], data.item_offsets[d + 1]
    dev = torch.device(device)
    if name not in registry.TRAINED:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(registry.TRAINED)}", "--model")
    if not has_model(seed_dir, name, data, domain):
        raise DataError(f"no {name} checkpoint for domain {domain}", seed_dir)
    if name in registry.BASELINES.values():
        model = load_baseline(seed_dir, registry.baseline_kind(name), data, domain, device)
        return as_domain_model(model, name, seed, domain, dev)
    if name == "UCLR":
        users, items = load_finetuned(Path(seed_dir), data, domain, device)
    else:
        users, items = vectors(seed_dir, name, data, device)[domain]
    return DomainModel(name, seed, domain, lo, hi - lo, users, items[lo:hi], device=dev)


def as_domain_model(model: SingleDomainModel, name: str, seed: int, domain: str, device) -> DomainModel:
    """A loaded single-domain baseline as a :class:`DomainModel` (dot tables when it has them)."""
    lo, n = model.item_offset, model.n_items
    tables = model.tables()
    if tables is not None:
        return DomainModel(name, seed, domain, lo, n, tables[0], tables[1], device=torch.device(device))
    # NeuMF holds (chunk, I_d, ·) GMF products and MLP activations at once
    width = 2 * model.dim + sum(lin.out_features for lin in model.mlp)
    return DomainModel(name, seed, domain, lo, n, None, None, model.scorer(), width, torch.device(device))


def valid_ndcg(model: DomainModel, data: Dataset, k: int = 10) -> float:
    """NDCG@k (0..1) of ``model`` on its domain's fixed validation candidates (NaN without rows)."""
    ev = data.valid[model.domain]
    if len(ev.users) == 0:
        return math.nan
    lo = model.item_offset
    ev = ev.to(model.device)
    if model.is_dot:
        ranks = rank_candidates(model.users, model.items, ev.users, ev.pos - lo, ev.negs - lo)
    else:
        cand = torch.cat([ev.pos.unsqueeze(1), ev.negs], dim=1)
        scores = torch.cat(
            [model.pair_scorer(ev.users[s : s + 4096], cand[s : s + 4096]) for s in range(0, len(ev.users), 4096)]
        )
        ranks = positive_ranks(scores[:, 0], scores[:, 1:])
    return float(summarize(ranks, [k])[("ndcg", k)])


@dataclass
class Choice:
    """A model picked for use: its name and seed, and the validation scores it was picked on."""

    name: str
    seed: int
    seed_dir: Path
    picked: bool  # True when chosen as the best on validation, False when asked for by name
    valid: dict[str, float] = field(default_factory=dict)  # model -> mean valid NDCG@10 over seeds (percent)


def choose(
    run_dir: Path,
    data: Dataset,
    domains: list[str],
    device,
    model: str | None = None,
    seed: int | None = None,
    allowed: Callable[[str], bool] = lambda _name: True,
) -> Choice:
    """The model and seed to use in ``domains``.

    ``model=None``: the trained model with the best validation NDCG@10, averaged
    over the seeds that hold it in every one of ``domains`` and then over the
    domains (only models for which ``allowed(name)``). ``seed=None``: the first
    seed that holds the chosen model.
    """
    seeds = layout.find_seeds(run_dir)
    if seed is not None:
        seeds = [(s, p) for s, p in seeds if s == seed]
        if not seeds:
            raise ConfigError(f"no seed-{seed} folder in the run", "--seed")
    if model is not None and model not in registry.TRAINED:
        raise ConfigError(f"unknown model {model!r}; known: {', '.join(registry.TRAINED)}", "--model")

    def holders(name: str) -> list[tuple[int, Path]]:
        return [(s, p) for s, p in seeds if all(has_model(p, name, data, d) for d in domains)]

    where = ", ".join(domains)
    if model is not None:
        held = holders(model)
        if not held:
            raise DataError(f"no {model} checkpoint for {where} in the chosen seed(s)", run_dir)
        return Choice(model, held[0][0], held[0][1], picked=False)
    scores: dict[str, float] = {}
    for name in registry.TRAINED:
        if not allowed(name):
            continue
        held = holders(name)
        if not held:
            continue
        per_domain = []
        for d in domains:
            vals = [valid_ndcg(domain_model(p, s, name, data, d, device), data) for s, p in held]
            vals = [v for v in vals if not math.isnan(v)]
            if vals:
                per_domain.append(100.0 * sum(vals) / len(vals))
        if per_domain:
            scores[name] = sum(per_domain) / len(per_domain)
    if not scores:
        raise DataError(f"no trained model with validation rows for {where} in the run (train first)", run_dir)
    best = max(scores, key=lambda n: (scores[n], -registry.TRAINED.index(n)))
    held = holders(best)
    return Choice(best, held[0][0], held[0][1], picked=True, valid=scores)
