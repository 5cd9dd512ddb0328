"""The run-folder layout and the name rules: the one place that builds or parses them.

    runs/<dataset>/config.json
    runs/<dataset>/seed-<s>/pretrain.safetensors, contrast[-global|-none].safetensors,
                            finetune-<domain>.safetensors, baseline-<model>-<domain>.safetensors,
                            baseline-cat-art-cat.safetensors (CAT-ART's CAT),
                            baseline-ga-mtcdr-joint.resume.safetensors (GA-MTCDR's joint training),
                            baseline-herograph-joint.resume.safetensors (HeroGraph's joint training)
                            and a ``*.resume.safetensors`` beside each
                            (pretrain under torchrun, until it ends: ``pretrain.dcp/``, see dcp.py)

Fixed names, no timestamps (docs/design.md §5). Domain names may hold ``-``, so a stage that writes composite kinds
(``cat-art-mf``, ``ga-mtcdr-walk``) or fixed names beside per-domain ones first checks that none of its names coincide
(:func:`check_distinct`). A seed folder is ``seed-<s>``
with ``s`` written in canonical decimal: ``seed-01`` is not the folder of seed
1 and is ignored, so one seed can never be counted twice.
"""

from __future__ import annotations

import re
from pathlib import Path

from uclr_cli.errors import DataError

CONFIG = "config.json"
PRETRAIN = "pretrain.safetensors"
#: contrast checkpoints by temperature mode; ``individual`` is the UCLR path.
CONTRAST = {
    "individual": "contrast.safetensors",
    "global": "contrast-global.safetensors",
    "none": "contrast-none.safetensors",
}
#: CAT-ART's CAT stage (its BPR-MF and ART checkpoints are ``baseline_name("cat-art-mf" | "cat-art", domain)``)
CAT_ART_CAT = "baseline-cat-art-cat.safetensors"
#: GA-MTCDR's joint model: only its resume state has this name (its best checkpoints are per target domain,
#: ``baseline_name("ga-mtcdr", domain)``; its graph embeddings ``baseline_name("ga-mtcdr-walk", domain)``)
GA_MTCDR_JOINT = "baseline-ga-mtcdr-joint.safetensors"
#: HeroGraph's joint model: only its resume state has this name (its best checkpoints are per target domain,
#: ``baseline_name("herograph", domain)``)
HEROGRAPH_JOINT = "baseline-herograph-joint.safetensors"
SEED_PREFIX = "seed-"
_SEED_DIR = re.compile(r"seed-(0|[1-9][0-9]{0,17})")
#: Domain names become parts of file names: lower-case letters, digits, ``_`` and ``-``, at most 64.
DOMAIN_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def is_domain_name(name: object) -> bool:
    return isinstance(name, str) and DOMAIN_NAME.fullmatch(name) is not None


def check_domain_name(name: object, where) -> str:
    """``name`` if it may be a domain (and so a file-name part), else a one-line :class:`DataError`."""
    if not is_domain_name(name):
        raise DataError(f"bad domain name {str(name)[:40]!r} (allowed: a-z, 0-9, _ and -; at most 64)", where)
    return name  # type: ignore[return-value]


def seed_dir(run: Path, seed: int) -> Path:
    return Path(run) / f"{SEED_PREFIX}{int(seed)}"


def seed_of(folder: Path | str) -> int | None:
    """The seed a folder name stands for (``seed-3`` -> 3), None for anything else (``seed-03`` included)."""
    m = _SEED_DIR.fullmatch(Path(folder).name)
    return int(m.group(1)) if m else None


def find_seeds(run_dir: Path) -> list[tuple[int, Path]]:
    """``(seed, folder)`` of every seed folder in ``run_dir``, sorted by seed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError("run folder not found (train first, or pass --run)", run_dir)
    found = []
    for p in run_dir.iterdir():
        s = seed_of(p)
        if s is not None and check_link(p) and p.is_dir():
            found.append((s, p))
    if not found:
        raise DataError("run folder has no seed-* folder (run `uclr pretrain` first)", run_dir)
    return sorted(found)


def check_link(path: Path) -> bool:
    """True; a symbolic link that leads nowhere (dangling, or a loop) is refused rather than taken for absent."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise DataError("a broken or looping symbolic link; fix or remove it", path)
    return True


def finetune_name(domain: str) -> str:
    """``finetune-<domain>.safetensors``; a domain name that is not a plain file-name part is refused."""
    return f"finetune-{check_domain_name(domain, '--domain')}.safetensors"


def baseline_name(kind: str, domain: str) -> str:
    """A single-domain baseline's checkpoint, e.g. ``baseline-neumf-books.safetensors``."""
    return f"baseline-{kind}-{check_domain_name(domain, '--domain')}.safetensors"


def check_distinct(domains, kinds, fixed: dict[str, str] | None = None, where=None) -> None:
    """Refuse, in one line, domains whose checkpoints would be one file.

    A stage writes ``baseline_name(kind, domain)`` for each of its ``kinds`` and
    every domain, and the ``fixed`` names (name -> what writes it); their resume
    companions follow from these (:func:`resume_name`, :func:`dcp_name`). Domain
    names may hold ``-``, so ``baseline_name("cat-art", "mf-x")`` is
    ``baseline_name("cat-art-mf", "x")`` and ``baseline_name("cat-art", "cat")``
    is :data:`CAT_ART_CAT`: unchecked, one checkpoint would overwrite the other.
    Called before the stage writes anything; names stay as they are, so old runs
    keep loading.
    """
    owner: dict[str, tuple[str, str | None]] = {name: (what, None) for name, what in (fixed or {}).items()}
    for kind in kinds:
        for domain in domains:
            name = baseline_name(kind, domain)
            other_kind, other = owner.setdefault(name, (kind, domain))
            if (other_kind, other) == (kind, domain):
                continue
            if other is None:
                clash, what = domain, f"domain {domain!r} would write {name} ({kind} of it), the file of {other_kind}"
            else:  # the domain of the shorter kind ends like the longer kind: that one is renamed
                clash = domain if len(kind) < len(other_kind) else other
                what = (
                    f"domains {other!r} and {domain!r} would write one file, {name} "
                    f"({other_kind} of {other!r}, {kind} of {domain!r})"
                )
            hint = f" (e.g. to {clash.replace('-', '_')!r})" if "-" in clash else ""
            raise DataError(f"{what}; rename domain {clash!r}{hint} and prepare the data again", where)


def resume_name(name: str) -> str:
    """The resume state that goes with a checkpoint name."""
    return name.replace(".safetensors", ".resume.safetensors")


def dcp_name(name: str) -> str:
    """The DCP state folder of a checkpoint name (both of its files while data-parallel: :mod:`uclr_cli.dcp`)."""
    return name.replace(".safetensors", ".dcp")
