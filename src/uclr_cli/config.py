"""One pydantic model per stage; defaults are the paper's settings.

``extra="forbid"`` everywhere: a typo in a config file or option is an
error naming the key, never silently ignored (unlike a flat untyped config).
Numbers and switches are strict (``StrictInt``, ``StrictFloat``, ``StrictBool``):
``epochs = true`` or ``train_ae = 1`` in a TOML file is refused, not read as 1 or
true; an integer is still a valid float. Paths stay lax (a TOML string is a Path).
The CLI reads each option's help default from these models (cli/options.py).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, model_validator

from uclr_cli.data.split import DEFAULT_BUCKETS
from uclr_cli.errors import ConfigError


class StageConfig(BaseModel):
    # allow_inf_nan=False: `lr = inf` or `mask_ratio = nan` (valid TOML) is refused, not trained on
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class PrepareConfig(StageConfig):
    """`uclr prepare`: raw logs (or the built-in generator) to a prepared folder (docs/design.md §2)."""

    source: Literal["amazon", "douban", "files", "synthetic"]
    raw: Path | None = None
    out: Path | None = Field(None, description="Output folder (default: data/<source>).")
    domains: list[str] | None = Field(None, description="Comma-separated domains to keep (default: all).")
    min_rating: StrictFloat | None = Field(None, description="Keep ratings >= R (default: every rating counts).")
    drop_items: StrictFloat = Field(
        0.0, ge=0.0, lt=1.0, description="Share of each domain's items removed at random (paper's Amazon: 0.7)."
    )
    negatives: StrictInt = Field(99, ge=1, le=10_000, description="Negative candidates per valid/test row.")
    seed: StrictInt = Field(0, ge=0, description="Seed of the split candidates (and the generator).")
    amazon_layout: Literal["auto", "user-item", "item-user"] = Field(
        "auto", description="Amazon CSV column order: auto | user-item | item-user."
    )
    user_col: str = Field("user", description="files: user column name.")
    item_col: str = Field("item", description="files: item column name.")
    rating_col: str = Field("rating", description="files: rating column name.")
    time_col: str = Field("timestamp", description="files: timestamp column name.")
    # synthetic only
    preset: Literal["default", "tiny", "amazon"] = Field(
        "default", description="synthetic: default | tiny | amazon (the paper's Amazon shape)."
    )
    users: StrictInt | None = Field(None, ge=2, description="synthetic: number of users.")
    items: list[StrictInt] | None = Field(None, description="synthetic: items per domain, comma-separated.")
    interactions: list[StrictInt] | None = Field(
        None, description="synthetic: interactions per domain, comma-separated."
    )

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
    elif isinstance(first.get("input"), bool) and first.get("type") in ("int_type", "float_type"):
        msg = (
            f"{key} must be {'an integer' if first['type'] == 'int_type' else 'a number'}, not {first['input']}".lower()
        )
    elif first.get("type") == "dict_type":
        msg = f"{key} must be a table of options, not {first.get('input')!r}"
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


def field_type(model: type[StageConfig], key: str):
    """The plain type of a field: ``list[StrictInt] | None`` -> ``list[int]``, ``StrictFloat`` -> ``float``."""
    return _plain(model.model_fields[key].annotation)


def _plain(tp):
    if get_origin(tp) is Annotated:
        return _plain(get_args(tp)[0])
    if get_origin(tp) in (Union, UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return _plain(args[0]) if len(args) == 1 else tp
    if get_origin(tp) is list:
        return list[_plain(get_args(tp)[0])]
    return tp


_TRUE = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def value_from_text(model: type[StageConfig], key: str, text: str) -> Any:
    """Read a command-line string as the field's type; the model then checks the value.

    Lists are comma-separated (``16,8``), switches true/false, numbers decimal;
    a string that is not of the type is a ``ValueError`` saying what was expected.
    """
    tp = field_type(model, key)
    if get_origin(tp) is list:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise ValueError("empty list")
        (item,) = get_args(tp)
        try:
            return [_scalar(item, p) for p in parts]
        except ValueError:
            raise ValueError(f"cannot read {text!r} as a list of {item.__name__}") from None
    return _scalar(tp, text.strip())


def _scalar(tp, text: str) -> Any:
    if tp is bool:
        if text.lower() not in _TRUE:
            raise ValueError(f"cannot read {text!r} as true or false")
        return _TRUE[text.lower()]
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ValueError(f"cannot read {text!r} as {'an integer' if tp is int else 'a number'}") from None
    return text  # str, Path and choices: the model checks them


Device = Literal["auto", "cpu", "cuda"]
#: Seeds name their folders ``seed-<s>``, which layout.py reads with at most 18 digits.
MAX_SEED = 10**18

# Descriptions are the command-line help (cli/options.py); the default is added from the field.
DATA_HELP = (
    "Prepared folder (default: the one the run folder's config.json records, "
    "else `data` in ./uclr.toml, else the only one under data/)."
)
RUN_HELP = "Run folder (default: runs/<dataset name>)."
DEVICE_HELP = "auto | cpu | cuda."
PATIENCE_HELP = "Evaluations without improvement before stopping."


class TrainConfig(StageConfig):
    """Options every training stage shares."""

    data: Path | None = Field(None, description=DATA_HELP)
    run: Path | None = Field(None, description=RUN_HELP)
    seeds: list[StrictInt] = Field(
        default_factory=lambda: [0], min_length=1, description="Comma-separated seeds, e.g. 0,1,2,3,4."
    )
    epochs: StrictInt = Field(100, ge=0, description="Maximum epochs.")
    batch_size: StrictInt = Field(2048, ge=2, description="Positives per step.")
    lr: StrictFloat = Field(1e-3, gt=0, description="Adam learning rate.")
    patience: StrictInt = Field(10, ge=1, description=PATIENCE_HELP)
    eval_every: StrictInt = Field(1, ge=1, description="Validate every N epochs.")
    device: Device = Field("auto", description=DEVICE_HELP)

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
    """PGE: BPR-MF over all domains (paper §3.3), or LightGCN on the union graph of every domain."""

    # Defaults chosen on validation (Douban, 3 seeds; the Amazon preset): docs/results.md. The paper's PGE
    # (λ = 1e-5, lr 1e-3, dense Adam, no bias) is examples/paper/pretrain.toml.
    dim: StrictInt = Field(128, ge=1, description="Embedding size m.")
    lr: StrictFloat = Field(3e-3, gt=0, description="Learning rate.")
    lr_decay: StrictFloat = Field(
        1.0, gt=0, le=1, description="Learning-rate decay per epoch: epoch e trains at lr·decay^(e-1) (1: constant)."
    )
    reg: StrictFloat = Field(0.03, ge=0, description="L2 weight λ on the rows of a batch (every role).")
    reg_user: StrictFloat | None = Field(None, ge=0, description="L2 weight on the batch's user rows (default: reg).")
    reg_pos: StrictFloat | None = Field(None, ge=0, description="L2 weight on the positive item rows (default: reg).")
    reg_neg: StrictFloat | None = Field(None, ge=0, description="L2 weight on the negative item rows (default: reg).")
    item_bias: StrictBool = Field(
        True,
        description="An item bias: one more column, fixed at 1 in every user row, so scores stay dot products.",
        json_schema_extra={"flag": "--item-bias/--no-item-bias"},
    )
    negatives: Literal["uniform", "popularity", "mix"] = Field(
        "uniform",
        description=(
            "Negatives of a domain-d positive, from domain d: uniform (the paper's) | popularity (in proportion "
            "to train interactions) | mix (popularity with probability --pop-share, else uniform)."
        ),
    )
    pop_share: StrictFloat = Field(0.5, ge=0, le=1, description="mix: share of popularity-drawn negatives.")
    n_negatives: StrictInt = Field(1, ge=1, le=256, description="Negatives per positive (BPR pairs per positive).")
    init: Literal["normal", "uniform"] = Field(
        "normal", description="Initial embeddings: normal | uniform, both with std --init-std."
    )
    init_std: StrictFloat = Field(0.1, gt=0, description="Std of the initial embeddings.")
    # "adam": dense Adam, the paper's setting. The row-wise ones update only the rows a batch touches:
    # "rowwise-rmsprop" is exactly dense Adam with beta1 = 0 (tested), "rowwise-adam" lazy Adam,
    # "rowwise-adagrad" and "rowwise-sgd" plain Adagrad and SGD on the touched rows. Numbers: docs/results.md.
    optimizer: Literal["adam", "rowwise-adam", "rowwise-rmsprop", "rowwise-adagrad", "rowwise-sgd"] = Field(
        "rowwise-rmsprop",
        description=(
            "rowwise-rmsprop (Adam with beta1=0 on the touched rows) | rowwise-adam (Adam on the touched rows) | "
            "rowwise-adagrad | rowwise-sgd | adam (dense, the paper's)."
        ),
    )
    encoder: Literal["mf", "lightgcn"] = Field(
        "mf",
        description=(
            "mf (the paper's) | lightgcn: the tables are propagated over the union user-item graph of every "
            "domain's train rows (mean of layers 0..K); trained with dense Adam."
        ),
    )
    layers: StrictInt = Field(2, ge=1, le=8, description="lightgcn: propagation layers K.")
    # torchrec's DistributedModelParallel over torchrun's ranks (the `distributed` extra; docs/distributed.md).
    sharding: Literal["none", "table", "column", "row"] = Field(
        "none",
        description=(
            "none (every rank holds both tables) | table | column | row: the tables split over torchrun's ranks "
            "by torchrec (CPU; dense Adam; needs the distributed extra)."
        ),
    )
    epochs: StrictInt = Field(200, ge=0, description="Maximum epochs.")
    # Seconds between writes of the resume state and best checkpoint (0: every epoch). A kill or
    # Ctrl-C resumes from the last write; the run's end is always written.
    save_every: StrictFloat = Field(30.0, ge=0, description="Seconds between resume checkpoints; 0 = every epoch.")

    def role_regs(self) -> tuple[float, float, float]:
        """(user, positive, negative) L2 weights."""
        pick = lambda v: self.reg if v is None else v  # noqa: E731
        return pick(self.reg_user), pick(self.reg_pos), pick(self.reg_neg)

    @model_validator(mode="after")
    def _encoder_options(self):
        # lightgcn: the optimizer and the bias follow the encoder unless set; writing __dict__ skips
        # validate_assignment, which would run this validator again. The dumped config says what ran.
        if self.encoder == "lightgcn" and self.optimizer != "adam":
            if "optimizer" in self.model_fields_set:
                raise ValueError("encoder lightgcn trains with dense Adam (--optimizer adam): every row moves")
            self.__dict__["optimizer"] = "adam"
        if self.encoder == "lightgcn" and self.item_bias:
            if "item_bias" in self.model_fields_set:
                raise ValueError("item_bias applies to --encoder mf only (propagation would mix the fixed column)")
            self.__dict__["item_bias"] = False
        if "layers" in self.model_fields_set and self.encoder != "lightgcn":
            raise ValueError("layers applies to --encoder lightgcn only")
        if self.sharding != "none" and self.encoder != "mf":
            raise ValueError("sharding applies to --encoder mf only")
        if self.sharding != "none" and self.optimizer != "adam":  # the shards are plain parameters: dense Adam
            if "optimizer" in self.model_fields_set:
                raise ValueError("sharding trains with dense Adam (--optimizer adam); the row-wise ones are unsharded")
            self.__dict__["optimizer"] = "adam"
        if "pop_share" in self.model_fields_set and self.negatives != "mix":
            raise ValueError("pop_share applies to --negatives mix only")
        return self


class ContrastLossConfig(StageConfig):
    """The user-aware contrastive loss and its temperature state (docs/design.md §3)."""

    temperature: Literal["individual", "global", "none"] = Field(
        "individual", description="individual (UCL-AE) | global (CL-AE) | none (AE)."
    )
    mask: Literal["row", "element"] = Field(
        "element", description="element (share of each row's entries) | row (whole rows, the paper's wording)."
    )
    mask_ratio: StrictFloat = Field(0.3, ge=0.0, lt=1.0, description="Share masked in stream 2.")
    alpha: StrictFloat = Field(1e-3, ge=0, description="Weight of the reconstruction loss.")
    tau_min: StrictFloat = Field(1e-5, gt=0, description="Lower bound of τ.")
    tau_max: StrictFloat = Field(1.0, gt=0, description="Upper bound of τ.")
    tau_init: StrictFloat = Field(0.1, gt=0, description="Initial τ.")
    tau_lr: StrictFloat = Field(0.01, ge=0, description="Step size of the τ update.")
    tau_beta: StrictFloat = Field(
        0.9, gt=0, le=1, description="Weight of the new gradient in the τ momentum (the paper's β0)."
    )
    tau_grad_clip: StrictFloat = Field(3.0, gt=0, description="Clip of the τ gradient, ±.")
    gamma: StrictFloat = Field(0.9, gt=0, le=1, description="Weight of the new estimate in the moving average u.")
    rho: StrictFloat = Field(0.3, ge=0, description="ρ of the ρ·τ term that keeps τ off its upper bound.")

    @model_validator(mode="after")
    def _tau_range(self):
        if self.tau_min >= self.tau_max:
            raise ValueError("tau_min must be below tau_max")
        if not self.tau_min <= self.tau_init <= self.tau_max:
            raise ValueError("tau_init must lie in [tau_min, tau_max]")
        return self


class ContrastConfig(TrainConfig, ContrastLossConfig):
    """The dual-stream autoencoder on the frozen PGE user table (paper §3.4)."""

    hidden: list[StrictInt] = Field(
        default_factory=lambda: [256, 128],
        min_length=1,
        description="Encoder sizes (the decoder mirrors them); the paper's are 128,32.",
    )
    batch_size: StrictInt = Field(2048, ge=2, description="Users per step.")
    # 3e-3 and 256,128 chosen on validation (docs/results.md, "Contrast in fewer epochs"); the paper's is 1e-3.
    lr: StrictFloat = Field(3e-3, gt=0, description="Adam learning rate of the autoencoder (the paper's is 1e-3).")
    # With the paper's batch of 2048 users a small dataset has one step per epoch
    # (Douban: 1,566 users); validation NDCG peaked at epochs 50-115 there.
    epochs: StrictInt = Field(300, ge=0, description="Maximum epochs.")
    patience: StrictInt = Field(20, ge=1, description=PATIENCE_HELP)

    @model_validator(mode="after")
    def _hidden(self):
        if any(h < 1 for h in self.hidden):
            raise ValueError("hidden sizes must be >= 1")
        return self


class FinetuneConfig(TrainConfig):
    """Domain-aware LoRA finetuning of the whole framework (paper §3.5)."""

    domain: str = Field("all", description="A domain name, or all.")
    rank: StrictInt = Field(8, ge=1, description="LoRA rank r.")
    lora_alpha: StrictFloat | None = Field(
        None, gt=0, description="LoRA scale numerator: W = W0 + (alpha/r)·B·A (default: r)."
    )
    reg: StrictFloat = Field(1e-5, ge=0, description="L2 weight on the rows of a batch.")
    # Chosen on Douban validation (3 seeds, docs/results.md): adapters only 26.45,
    # +autoencoder+τ 26.23, +items 26.26, without the contrastive term 26.16 (start: 26.08).
    train_ae: StrictBool = Field(
        False,
        description="Also finetune the autoencoder (off by default: validation preferred the adapter alone).",
        json_schema_extra={"flag": "--train-ae/--freeze-ae"},
    )
    train_tau: StrictBool = Field(
        False, description="Keep updating the temperatures.", json_schema_extra={"flag": "--train-tau/--freeze-tau"}
    )
    train_items: StrictBool = Field(
        False,
        description="Also finetune the domain's item embeddings.",
        json_schema_extra={"flag": "--train-items/--freeze-items"},
    )
    # 0 by default: on the λ = 0.03 PGE, Douban validation (3 seeds) scored BPR alone 30.30 against 30.10 with the
    # paper's term (weight 1, 2048 users) at a fifth of the cost (docs/results.md); examples/paper/ sets 1.
    contrast_weight: StrictFloat = Field(
        0.0, ge=0, description="Weight of the combined contrastive loss in each step (the paper's: 1)."
    )
    batch_size: StrictInt = Field(2048, ge=2, description="Positives (and contrast users) per step.")
    contrast_users: StrictInt | None = Field(
        None, ge=2, description="Users in each step's contrastive batch (default: --batch-size, the paper's)."
    )
    # Short by default: on the validation-chosen PGE finetuning adds little (docs/results.md), so it should
    # cost little; the paper's schedule (50 epochs, patience 10) is examples/paper/finetune.toml.
    epochs: StrictInt = Field(10, ge=0, description="Maximum epochs.")
    patience: StrictInt = Field(3, ge=1, description=PATIENCE_HELP)


#: Options that only some baselines read; setting one for another model is an error, not ignored.
BASELINE_OPTIONS: dict[str, tuple[str, ...]] = {
    "reg_user": ("bprmf", "lightgcn"),
    "reg_pos": ("bprmf", "lightgcn"),
    "reg_neg": ("bprmf", "lightgcn"),
    "item_bias": ("bprmf",),
    "optimizer": ("bprmf",),
    "mlp_layers": ("neumf",),
    "pretrain_towers": ("neumf",),
    "layers": ("lightgcn",),
}
#: the row-wise optimizers (a fused BPR step on the touched rows, optim.BPRRowStep) by option value
ROWWISE = {"rowwise-adam": "adam", "rowwise-rmsprop": "rmsprop", "rowwise-adagrad": "adagrad", "rowwise-sgd": "sgd"}


#: Per-model defaults of the baselines, chosen on Douban validation with the same 7-point budget as PGE's
#: (docs/results.md, issue 11). NeuMF had no grid yet: it keeps the fields' defaults (lr 1e-3, reg 1e-5).
BASELINE_DEFAULTS: dict[str, dict] = {
    "bprmf": {"lr": 3e-3, "reg": 0.03, "optimizer": "rowwise-rmsprop", "item_bias": True},
    "lightgcn": {"lr": 3e-3, "reg": 1e-3},
}


class BaselineConfig(TrainConfig):
    """Single-domain baselines of the paper's Table 2: BPRMF, NeuMF, LightGCN."""

    model: Literal["bprmf", "neumf", "lightgcn"] = "bprmf"
    domain: str = Field("all", description="A domain name, or all.")
    dim: StrictInt = Field(128, ge=1, description="Embedding size m.")
    # lr, reg and bprmf's optimizer / item bias: the defaults below are NeuMF's; BASELINE_DEFAULTS has the others
    lr: StrictFloat = Field(1e-3, gt=0, description="Learning rate.")
    reg: StrictFloat = Field(1e-5, ge=0, description="L2 weight on the embedding rows of a batch.")
    # The options PGE has, where they apply (issue 11: the same care for the baselines as for our model).
    reg_user: StrictFloat | None = Field(None, ge=0, description="bprmf, lightgcn: L2 on the user rows (default: reg).")
    reg_pos: StrictFloat | None = Field(
        None, ge=0, description="bprmf, lightgcn: L2 on the positive rows (default: reg)."
    )
    reg_neg: StrictFloat | None = Field(
        None, ge=0, description="bprmf, lightgcn: L2 on the negative rows (default: reg)."
    )
    item_bias: StrictBool = Field(
        False,
        description="bprmf: an item bias column (1 in every user row), as PGE's.",
        json_schema_extra={"flag": "--item-bias/--no-item-bias"},
    )
    optimizer: Literal["rowwise-adam", "rowwise-rmsprop", "rowwise-adagrad", "rowwise-sgd"] = Field(
        "rowwise-adam",
        description="bprmf: rowwise-adam | rowwise-rmsprop | rowwise-adagrad | rowwise-sgd (on the touched rows).",
    )
    negatives: Literal["uniform", "popularity", "mix"] = Field(
        "uniform",
        description="Negatives from the domain: uniform | popularity (by train counts) | mix (see --pop-share).",
    )
    pop_share: StrictFloat = Field(0.5, ge=0, le=1, description="mix: share of popularity-drawn negatives.")
    n_negatives: StrictInt | None = Field(
        None, ge=1, le=1000, description="Negatives per positive (default: 4 for neumf, 1 for bprmf and lightgcn)."
    )
    init: Literal["normal", "uniform"] = Field(
        "normal", description="Initial embeddings: normal | uniform, both with std --init-std."
    )
    init_std: StrictFloat = Field(0.1, gt=0, description="Std of the initial embeddings.")
    # NeuMF (He et al., 2017)
    mlp_layers: list[StrictInt] = Field(
        default_factory=lambda: [128, 64], min_length=1, description="neumf: MLP layer sizes after the 2m input."
    )
    pretrain_towers: StrictBool = Field(
        False,
        description="neumf: train GMF and MLP alone first, start NeuMF from them.",
        json_schema_extra={"flag": "--pretrain-towers/--no-pretrain-towers"},
    )
    # LightGCN (He et al., 2020)
    layers: StrictInt = Field(3, ge=0, le=16, description="lightgcn: propagation layers K.")

    @model_validator(mode="before")
    @classmethod
    def _old_negatives_and_model_defaults(cls, v):
        if isinstance(v, dict) and isinstance(v.get("negatives"), int) and not isinstance(v["negatives"], bool):
            raise ValueError(
                "negatives is the sampler now (uniform | popularity | mix); the count per positive is n_negatives"
            )
        if isinstance(v, dict):  # what the user gave wins over the model's defaults
            v = {**BASELINE_DEFAULTS.get(v.get("model", cls.model_fields["model"].default), {}), **v}
        return v

    def role_regs(self) -> tuple[float, float, float]:
        """(user, positive, negative) L2 weights."""
        pick = lambda v: self.reg if v is None else v  # noqa: E731
        return pick(self.reg_user), pick(self.reg_pos), pick(self.reg_neg)

    def negatives_per_positive(self, kind: str) -> int:
        """``n_negatives``, or its default for ``kind`` (NeuMF's paper: 4; a BPR pair: 1)."""
        if self.n_negatives is not None:
            return self.n_negatives
        return 4 if kind in ("neumf", "gmf", "mlp") else 1

    @model_validator(mode="after")
    def _model_options(self):
        if "pop_share" in self.model_fields_set and self.negatives != "mix":
            raise ValueError("pop_share applies to --negatives mix only")
        if any(h < 1 for h in self.mlp_layers):
            raise ValueError("mlp_layers sizes must be >= 1")
        for key, owners in BASELINE_OPTIONS.items():
            if key in self.model_fields_set and self.model not in owners:
                raise ValueError(f"{key} applies to {' and '.join(owners)} only, not {self.model}")
        return self


class CatArtConfig(TrainConfig):
    """CAT-ART (Li et al., WSDM 2023): per-domain BPR-MF, the contrastive autoencoder CAT, then ART per target.

    ``epochs``, ``patience``, ``lr`` and ``batch_size`` are those of stages 1 (BPR-MF) and 3 (ART), both
    stopped early on the domain's validation NDCG@10; CAT has its own (``cat_*``).
    """

    domain: str = Field("all", description="Target domain of ART: a domain name, or all.")
    dim: StrictInt = Field(128, ge=1, description="Embedding size d.")
    # λ and lr chosen on validation (Douban, 3 seeds, the same 7-point budget as PGE's; docs/results.md). The
    # original's 1e-4 * 0.5 * (|u|^2 + |i+|^2 + |i-|^2) / B is λ 5e-5 here, with lr 1e-3:
    # examples/paper/cat-art.toml.
    lr: StrictFloat = Field(3e-3, gt=0, description="Adam learning rate (BPR-MF and ART).")
    reg: StrictFloat = Field(3e-2, ge=0, description="L2 weight on the batch's user and item rows (BPR-MF and ART).")
    init_std: StrictFloat = Field(0.1, gt=0, description="Std of the initial BPR-MF embeddings.")
    cat_epochs: StrictInt = Field(100, ge=0, description="CAT: maximum epochs.")
    cat_patience: StrictInt = Field(10, ge=1, description="CAT: epochs without a lower training loss before stopping.")
    cat_batch_size: StrictInt = Field(256, ge=2, description="CAT: users per step (the InfoNCE negatives).")
    cat_lr: StrictFloat = Field(1e-3, gt=0, description="CAT: Adam learning rate.")
    temperature: StrictFloat = Field(0.1, gt=0, description="CAT: InfoNCE temperature.")
    cl_weight: StrictFloat = Field(0.2, ge=0, description="CAT: weight of the InfoNCE term.")
    rec_weight: StrictFloat = Field(0.4, ge=0, description="CAT: weight of each reconstruction term (x and x~).")
    dropout: StrictFloat = Field(0.1, ge=0, lt=1, description="ART: dropout on the attention weights.")


class GaMtcdrConfig(TrainConfig):
    """GA-MTCDR (Zhu et al., TKDE 2023), interaction-only: DeepWalk + skip-gram per domain (frozen), then one joint
    model of every target domain (element-wise attention over the domains' user vectors, towers, cosine).

    ``epochs``, ``patience``, ``lr`` and ``batch_size`` are those of the joint model, stopped early on validation
    NDCG@10 averaged over the target domains; the graph embedding has its own (``walk_*``, ``sg_*``).
    """

    domain: str = Field("all", description="Target domains trained and written: a domain name, or all.")
    dim: StrictInt = Field(128, ge=1, description="Embedding size K (node vectors, projections, tower output).")
    walk_length: StrictInt = Field(30, ge=2, le=1000, description="Walks: nodes per walk (the original's 30).")
    walks_per_node: StrictInt = Field(
        10,
        ge=1,
        description="Walks: walks from every node with edges, per skip-gram epoch (the original's 100; 10 for cost).",
    )
    window: StrictInt = Field(10, ge=1, description="Skip-gram: context window (the original's 10).")
    sg_negatives: StrictInt = Field(5, ge=1, le=100, description="Skip-gram: negatives per pair (word2vec's 5).")
    sg_epochs: StrictInt = Field(1, ge=0, description="Skip-gram: passes over the walks (word2vec's default is 5).")
    sg_lr: StrictFloat = Field(
        0.025, gt=0, description="Skip-gram: SGD learning rate, decayed linearly to 1e-4 of it (word2vec's)."
    )
    sg_batch_size: StrictInt = Field(8192, ge=1, description="Skip-gram: (centre, context) pairs per SGD step.")
    n_negatives: StrictInt = Field(7, ge=1, le=1000, description="Uniform negatives per positive (the original's 7).")
    batch_size: StrictInt = Field(
        4096, ge=2, description="Pairs per step, positives and their negatives together (the original's 4096)."
    )
    epochs: StrictInt = Field(50, ge=0, description="Maximum epochs (the original's 50).")
    patience: StrictInt = Field(5, ge=1, description=PATIENCE_HELP)
    # the original's 1e-3 * (l2_loss(u) + l2_loss(i)) on a summed loss, as our λ·mean of squared norms
    reg: StrictFloat = Field(5e-4, ge=0, description="L2 weight on the pairs' tower outputs.")


class HeroGraphConfig(TrainConfig):
    """HeroGraph (Cui et al., 2020), reconstructed from the paper's description (no public code): one shared graph
    of every domain's train interactions, per-domain user and item tables, a cross-domain embedding by recurrent
    attention (GRU) over sampled neighbours; BPR per domain, trained jointly, one model per target domain.

    Stopped early on validation NDCG@10 averaged over the target domains.
    """

    domain: str = Field("all", description="Target domains trained and written: a domain name, or all.")
    dim: StrictInt = Field(128, ge=1, description="Embedding size K (domain tables and graph embeddings).")
    neighbours: StrictInt = Field(
        30, ge=1, le=1000, description="Neighbours sampled per node, at most (redrawn every epoch)."
    )
    steps: StrictInt = Field(2, ge=1, le=16, description="Recurrent attention steps T (GRU updates).")
    # our choice (the paper gives no value): CAT-ART's λ here
    reg: StrictFloat = Field(5e-5, ge=0, description="L2 weight on the batch's final user and item vectors.")
    init_std: StrictFloat = Field(0.1, gt=0, description="Std of the initial tables.")
    batch_size: StrictInt = Field(2048, ge=2, description="Positives per step (one domain per step, in turn).")
    epochs: StrictInt = Field(50, ge=0, description="Maximum epochs.")
    patience: StrictInt = Field(5, ge=1, description=PATIENCE_HELP)


def _non_empty_path(p: Path | None, key: str) -> None:
    if p is not None and str(p).strip() in ("", "."):
        raise ValueError(f"{key} needs a file name")


class EvaluateConfig(StageConfig):
    """What `uclr evaluate` scores and writes (docs/design.md §4); checked before any work."""

    data: Path | None = Field(None, description=DATA_HELP)
    run: Path | None = Field(None, description="Run folder with seed-* folders (default: runs/<dataset name>).")
    split: Literal["test", "valid"] = Field(
        "test", description="test | valid (select models on valid; read test once)."
    )
    k: list[Annotated[StrictInt, Field(ge=1)]] = Field(
        default_factory=lambda: [10, 20], min_length=1, description="Comma-separated cut-offs K."
    )
    by_activity: StrictBool = Field(False, description="Add a table per activity bucket (users by train interactions).")
    buckets: list[StrictInt] = Field(
        default_factory=lambda: list(DEFAULT_BUCKETS),
        min_length=1,
        description="Lower edges of the activity buckets, starting at 0.",
    )
    out: Path | None = Field(None, description="Write per-seed, per-bucket rows to this parquet file.")
    plot: Path | None = Field(None, description="Save a PNG of NDCG@(first K) by activity bucket (needs matplotlib).")
    protocol: list[Literal["sampled", "full"]] = Field(
        default_factory=lambda: ["sampled"],
        min_length=1,
        description="sampled (the 99 fixed negatives), full (every item the user did not interact with), or both.",
    )
    device: Device = Field("auto", description=DEVICE_HELP)

    @model_validator(mode="after")
    def _check(self):
        if self.buckets[0] != 0:
            raise ValueError("buckets must start at 0 (every user has >= 0 train interactions)")
        if any(b <= a for a, b in zip(self.buckets, self.buckets[1:])):
            raise ValueError("buckets must be strictly increasing")
        _non_empty_path(self.out, "out")
        _non_empty_path(self.plot, "plot")
        return self


#: Keys of a stage table that `uclr ablate` sets itself, with the reason a table may not.
ABLATE_OWNS = {
    "seeds": "ablate trains every seed of the top-level seeds (or --seeds)",
    "domain": "ablate finetunes every domain of the top-level domains (or --domains)",
    "temperature": "ablate trains every temperature mode (none, global, individual)",
    "device": "set device at the top level (or --device): it applies to every stage",
    "data": "set data at the top level (or --data)",
    "run": "set run at the top level (or --run)",
}


class AblateConfig(StageConfig):
    """`uclr ablate`: the top-level keys, and one table of options per stage (each read by its own model)."""

    data: Path | None = Field(None, description=DATA_HELP)
    run: Path | None = Field(None, description=RUN_HELP)
    seeds: list[Annotated[StrictInt, Field(ge=0)]] = Field(
        default_factory=lambda: [0, 1, 2, 3, 4], min_length=1, description="Comma-separated seeds."
    )
    domains: list[str] | None = Field(None, min_length=1, description="Domains to finetune and report (default: all).")
    device: Device = Field("auto", description=DEVICE_HELP)
    k: list[Annotated[StrictInt, Field(ge=1)]] = Field(
        default_factory=lambda: [10], min_length=1, description="Cut-offs of the final table, e.g. 10,20."
    )
    pretrain: dict[str, Any] = Field(default_factory=dict)
    contrast: dict[str, Any] = Field(default_factory=dict)
    finetune: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _distinct(self):
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        if self.domains is not None:
            twice = sorted({d for d in self.domains if self.domains.count(d) > 1})
            if twice:
                raise ValueError(f"domains must be distinct; {twice[0]} is listed twice")
        return self


#: The stage tables of an ablate config and the model that reads each.
ABLATE_STAGES: dict[str, type[StageConfig]] = {
    "pretrain": PretrainConfig,
    "contrast": ContrastConfig,
    "finetune": FinetuneConfig,
}
