"""The `prepare` stage: raw logs (or generated data) -> a prepared folder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from uclr_cli.config import PrepareConfig
from uclr_cli.data import synthetic
from uclr_cli.data.dataset import check_out, sha256_file, write_prepared
from uclr_cli.data.raw import RawDomain
from uclr_cli.data.split import build_tables
from uclr_cli.errors import ConfigError


@dataclass
class PrepareResult:
    out: Path
    manifest: dict
    warnings: list[str]


def _synthetic_spec(cfg: PrepareConfig) -> synthetic.SyntheticSpec:
    base = synthetic.PRESETS[cfg.preset]
    kw: dict = {"seed": cfg.seed}
    if cfg.domains is not None:  # names become file-name parts: normalised like file names
        from uclr_cli.data.readers import safe_domain_name

        names = tuple(safe_domain_name(d, "--domains") for d in cfg.domains)
        if len(set(names)) != len(names):
            raise ConfigError("a domain is given twice", "--domains")
        kw["domains"] = names
    if cfg.users is not None:
        kw["users"] = cfg.users
    n_dom = len(kw.get("domains", base.domains))
    for key in ("items", "interactions"):
        val = getattr(cfg, key)
        if val is not None:
            kw[key] = tuple(val * n_dom if len(val) == 1 else val)
        elif n_dom != len(base.domains):
            if n_dom > len(base.domains):
                raise ConfigError(f"give --{key} for {n_dom} domains", f"--{key}")
            kw[key] = getattr(base, key)[:n_dom]
    if cfg.users is not None and cfg.interactions is None and cfg.preset == "default":
        scale = cfg.users / base.users
        kw["interactions"] = tuple(max(cfg.users, int(n * scale)) for n in kw.get("interactions", base.interactions))
    return synthetic.SyntheticSpec(**{**base.__dict__, **kw})


def read_source(cfg: PrepareConfig) -> tuple[list[RawDomain], dict]:
    """Raw domains for the configured source, and the source description for the manifest."""
    if cfg.source == "synthetic":
        spec = _synthetic_spec(cfg)
        return synthetic.generate(spec), {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.__dict__.items()}
    from uclr_cli.data import readers

    raw = Path(cfg.raw)
    if cfg.source == "amazon":
        found = readers.read_amazon(raw, csv_layout=cfg.amazon_layout)
    elif cfg.source == "douban":
        found = readers.read_douban(raw)
    else:
        found = readers.read_files(
            raw, user_col=cfg.user_col, item_col=cfg.item_col, rating_col=cfg.rating_col, time_col=cfg.time_col
        )
    chosen = readers.select_domains(found, cfg.domains, "--domains")
    return chosen, {}


def run(cfg: PrepareConfig, *, on_warning: Callable[[str], None] | None = None) -> PrepareResult:
    """Read, filter, split, draw candidates and write ``cfg.out`` atomically."""
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        if on_warning:
            on_warning(msg)

    out = Path(cfg.out) if cfg.out is not None else Path("data") / cfg.source
    check_out(out)  # before any work: never replace a folder that is not a prepared one
    raw_domains, generator = read_source(cfg)
    tables = build_tables(
        raw_domains,
        min_rating=cfg.min_rating,
        drop_items=cfg.drop_items,
        negatives=cfg.negatives,
        seed=cfg.seed,
        warn=warn,
    )
    sources = []
    for rd in raw_domains:
        entry = {"domain": rd.name, **rd.meta}
        if rd.path is not None:  # file name only: no absolute paths in the manifest
            entry["file"] = Path(rd.path).name
            entry["sha256"] = sha256_file(Path(rd.path))
        sources.append(entry)
    options = cfg.model_dump(mode="json", exclude={"raw", "out"})
    if generator:
        options["generator"] = generator
    manifest = write_prepared(tables, out, name=out.name, source=cfg.source, sources=sources, options=options)
    return PrepareResult(out=out, manifest=manifest, warnings=warnings)
