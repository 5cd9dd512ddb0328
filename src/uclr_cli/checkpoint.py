"""safetensors checkpoints: fixed names, metadata in the header, refusal on mismatch.

No pickle anywhere: a file that is not a valid safetensors file is refused
before anything in it is interpreted. Writes go to a temporary file that is
fsynced and renamed, so a kill leaves the old file or the new one, never half.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from uclr_cli import __version__
from uclr_cli.errors import CheckpointError

FORMAT_VERSION = "1"
PRETRAIN = "pretrain.safetensors"
#: contrast checkpoints by temperature mode; `individual` is the UCLR path.
CONTRAST = {"individual": "contrast.safetensors", "global": "contrast-global.safetensors", "none": "contrast-none.safetensors"}
CONFIG = "config.json"


def finetune_name(domain: str) -> str:
    return f"finetune-{domain}.safetensors"


def resume_name(name: str) -> str:
    """The per-epoch resume state that goes with a checkpoint name."""
    return name.replace(".safetensors", ".resume.safetensors")


def save(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically write ``tensors`` with ``meta`` (JSON-encoded values) in the header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format_version": FORMAT_VERSION, "package_version": __version__}
    header.update({k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in meta.items()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=header)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_header(path: Path) -> dict:
    """The decoded metadata of a checkpoint; refuses anything that is not safetensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint not found", path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError("not a safetensors file (truncated header)", path)
            n = int.from_bytes(head, "little")
            if n <= 1 or n > 100_000_000 or n + 8 > path.stat().st_size:
                raise CheckpointError("not a safetensors file (bad header length)", path)
            raw = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError("not a safetensors file (unreadable header)", path) from None
    meta = raw.get("__metadata__") if isinstance(raw, dict) else None
    if not isinstance(meta, dict):
        raise CheckpointError("checkpoint has no uclr metadata", path)
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except (ValueError, TypeError):
            out[k] = v
    return out


def load(path: Path, *, stage: str, fingerprint: str | None = None, expect: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load tensors and metadata, refusing another stage, dataset or shape.

    ``expect`` maps metadata keys to required values (e.g. {"dim": 128});
    every mismatch is named in a one-line error.
    """
    path = Path(path)
    meta = read_header(path)
    if str(meta.get("format_version")) != FORMAT_VERSION:
        raise CheckpointError(f"unsupported checkpoint format {meta.get('format_version')!r}", path)
    if meta.get("stage") != stage:
        raise CheckpointError(f"checkpoint is of stage '{meta.get('stage')}', expected '{stage}'", path)
    if fingerprint is not None and meta.get("dataset") != fingerprint:
        raise CheckpointError("checkpoint was trained on another dataset (fingerprint differs)", path)
    for key, want in (expect or {}).items():
        got = meta.get(key)
        if got == want:
            continue
        if isinstance(want, dict) and isinstance(got, dict):
            diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            raise CheckpointError(f"checkpoint was made with other {key} ({', '.join(diff[:4])} differ)", path)
        raise CheckpointError(f"checkpoint has {key}={got!r}, expected {want!r}", path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"corrupt checkpoint ({str(e).splitlines()[0][:80]})", path) from None
    return tensors, meta


def write_json(path: Path, payload: dict) -> None:
    """Atomic JSON write (config, metrics summaries)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
