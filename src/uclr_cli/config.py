"""One pydantic model per stage; defaults are the paper's settings.

``extra="forbid"`` everywhere: a typo in a config file or option is an
error naming the key, never silently ignored (unlike a flat untyped config).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from uclr_cli.errors import ConfigError


class StageConfig(BaseModel):
    # allow_inf_nan=False: `lr = inf` or `mask_ratio = nan` (valid TOML) is refused, not trained on
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class PrepareConfig(StageConfig):
    source: Literal["amazon", "douban", "files", "synthetic"]
    raw: Path | None = None
    out: Path | None = None
    domains: list[str] | None = None
    min_rating: float | None = None
    drop_items: float = Field(0.0, ge=0.0, lt=1.0)
    negatives: int = Field(99, ge=1, le=10_000)
    seed: int = Field(0, ge=0)
    amazon_layout: Literal["auto", "user-item", "item-user"] = "auto"
    user_col: str = "user"
    item_col: str = "item"
    rating_col: str = "rating"
    time_col: str = "timestamp"
    # synthetic only
    preset: Literal["default", "tiny", "amazon"] = "default"
    users: int | None = Field(None, ge=2)
    items: list[int] | None = None
    interactions: list[int] | None = None

    @model_validator(mode="after")
    def _raw_needed(self):
        if self.source != "synthetic" and self.raw is None:
            raise ValueError(f"source '{self.source}' needs a RAW folder")
        return self


def format_validation_error(err: ValidationError, where_for=None) -> ConfigError:
    """Turn pydantic's report into one line naming the key (``where_for(key)`` says where it came from)."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first.get("loc", ()) if not isinstance(p, int))
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = "unknown key"
    if not key:  # a check across keys: name the first key the message mentions
        key = next((f for f in sorted(err.title and _fields(err), key=len, reverse=True) if f in msg), "")
    where = where_for(key) if where_for else (f"--{key.replace('_', '-')}" if key else "options")
    return ConfigError(f"{msg}: {key}" if key and key not in msg else msg, where)


def _fields(err: ValidationError) -> list[str]:
    model = globals().get(err.title)
    return list(getattr(model, "model_fields", {}))


def build(model: type[StageConfig], values: dict[str, Any], where_for=None) -> StageConfig:
    try:
        return model(**values)
    except ValidationError as e:
        raise format_validation_error(e, where_for) from None


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file; keys use underscores or dashes."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", path)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"invalid TOML: {e}", path) from None
    return {k.replace("-", "_"): v for k, v in data.items()}


Device = Literal["auto", "cpu", "cuda"]
#: Seeds name their folders ``seed-<s>``, which layout.py reads with at most 18 digits.
MAX_SEED = 10**18


class TrainConfig(StageConfig):
    """Options every training stage shares."""

    data: Path | None = None
    run: Path | None = None
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    epochs: int = Field(100, ge=0)
    batch_size: int = Field(2048, ge=2)
    lr: float = Field(1e-3, gt=0)
    patience: int = Field(10, ge=1)
    eval_every: int = Field(1, ge=1)
    device: Device = "auto"

    @model_validator(mode="after")
    def _seeds(self):
        if any(s < 0 for s in self.seeds):
            raise ValueError("seeds must be >= 0")
        if any(s >= MAX_SEED for s in self.seeds):  # seed-<s> folders have at most 18 digits (layout.py)
            raise ValueError(f"seeds must be below {MAX_SEED:.0e} (at most 18 digits)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        return self


class PretrainConfig(TrainConfig):
    """PGE: BPR-MF over all domains (paper §3.3)."""

    dim: int = Field(128, ge=1)
    reg: float = Field(1e-5, ge=0)
    init_std: float = Field(0.1, gt=0)
    # "adam": dense Adam, the paper's setting. "rowwise-adam": Adam on the rows a
    # batch touches (lazy Adam). "rowwise-rmsprop" (default): exactly dense Adam
    # with beta1 = 0, computed on the touched rows; above dense Adam on Douban
    # validation (5 seeds) and several times faster. Numbers: docs/results.md.
    optimizer: Literal["adam", "rowwise-adam", "rowwise-rmsprop"] = "rowwise-rmsprop"
    epochs: int = Field(200, ge=0)
    # Seconds between writes of the resume state and best checkpoint (0: every epoch). A kill or
    # Ctrl-C resumes from the last write; the run's end is always written.
    save_every: float = Field(30.0, ge=0)


class ContrastLossConfig(StageConfig):
    """The user-aware contrastive loss and its temperature state (docs/design.md §3)."""

    temperature: Literal["individual", "global", "none"] = "individual"
    mask: Literal["row", "element"] = "element"
    mask_ratio: float = Field(0.3, ge=0.0, lt=1.0)
    alpha: float = Field(1e-3, ge=0)
    tau_min: float = Field(1e-5, gt=0)
    tau_max: float = Field(1.0, gt=0)
    tau_init: float = Field(0.1, gt=0)
    tau_lr: float = Field(0.01, ge=0)
    tau_beta: float = Field(0.9, gt=0, le=1)
    tau_grad_clip: float = Field(3.0, gt=0)
    gamma: float = Field(0.9, gt=0, le=1)
    rho: float = Field(0.3, ge=0)

    @model_validator(mode="after")
    def _tau_range(self):
        if self.tau_min >= self.tau_max:
            raise ValueError("tau_min must be below tau_max")
        if not self.tau_min <= self.tau_init <= self.tau_max:
            raise ValueError("tau_init must lie in [tau_min, tau_max]")
        return self


class ContrastConfig(TrainConfig, ContrastLossConfig):
    """The dual-stream autoencoder on the frozen PGE user table (paper §3.4)."""

    hidden: list[int] = Field(default_factory=lambda: [128, 32], min_length=1)
    # With the paper's batch of 2048 users a small dataset has one step per epoch
    # (Douban: 1,566 users); validation NDCG peaked at epochs 50-115 there.
    epochs: int = Field(300, ge=0)
    patience: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _hidden(self):
        if any(h < 1 for h in self.hidden):
            raise ValueError("hidden sizes must be >= 1")
        return self


class FinetuneConfig(TrainConfig):
    """Domain-aware LoRA finetuning of the whole framework (paper §3.5)."""

    domain: str = "all"
    rank: int = Field(8, ge=1)
    lora_alpha: float | None = Field(None, gt=0)  # default: equal to rank (scale 1)
    reg: float = Field(1e-5, ge=0)
    # Chosen on Douban validation (3 seeds, docs/results.md): adapters only 26.45,
    # +autoencoder+τ 26.23, +items 26.26, without the contrastive term 26.16 (start: 26.08).
    train_ae: bool = False
    train_tau: bool = False
    train_items: bool = False
    contrast_weight: float = Field(1.0, ge=0)
    epochs: int = Field(50, ge=0)


#: Options that only some baselines read; setting one for another model is an error, not ignored.
BASELINE_OPTIONS: dict[str, tuple[str, ...]] = {
    "negatives": ("neumf",),
    "mlp_layers": ("neumf",),
    "pretrain_towers": ("neumf",),
    "layers": ("lightgcn",),
}


class BaselineConfig(TrainConfig):
    """Single-domain baselines of the paper's Table 2: BPRMF, NeuMF, LightGCN."""

    model: Literal["bprmf", "neumf", "lightgcn"] = "bprmf"
    domain: str = "all"
    dim: int = Field(128, ge=1)
    reg: float = Field(1e-5, ge=0)
    init_std: float = Field(0.1, gt=0)
    # NeuMF (He et al., 2017)
    negatives: int = Field(4, ge=1, le=1000)
    mlp_layers: list[int] = Field(default_factory=lambda: [128, 64], min_length=1)
    pretrain_towers: bool = False
    # LightGCN (He et al., 2020)
    layers: int = Field(3, ge=0, le=16)

    @model_validator(mode="after")
    def _model_options(self):
        if any(h < 1 for h in self.mlp_layers):
            raise ValueError("mlp_layers sizes must be >= 1")
        for key, owners in BASELINE_OPTIONS.items():
            if key in self.model_fields_set and self.model not in owners:
                raise ValueError(f"{key} applies to {' and '.join(owners)} only, not {self.model}")
        return self
