"""safetensors checkpoints: fixed names, metadata in the header, refusal on mismatch.

No pickle anywhere: a file that is not a valid safetensors file is refused
before anything in it is interpreted. Writes go to a temporary file that is
fsynced and renamed, so a kill leaves the old file or the new one, never half;
a failed write (disk full) leaves the old file and is one :class:`CheckpointError`.
The header holds a sha256 of the metadata and tensors (``content_sha256``),
checked on load, so a file damaged after it was written is refused too.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from uclr_cli import __version__, layout
from uclr_cli.errors import CheckpointError, os_reason
from uclr_cli.files import atomic_write

FORMAT_VERSION = "1"
DIGEST = "content_sha256"


def content_digest(tensors: dict[str, torch.Tensor], header: dict) -> str:
    """sha256 over the header entries (but the digest) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in header.items() if k != DIGEST}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"\0{name}\0{str(t.dtype)}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


#: safetensors dtype codes of the tensors we write.
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors bytes of ``tensors``, identical for identical input.

    safetensors' own writer puts the metadata in hash-map order, which changes
    from one process to the next; here the header is JSON with sorted keys and
    the tensors are laid out by name, so two identical runs write identical files.
    """
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
    """Write :func:`serialize`'s bytes to ``filename`` (the one place checkpoint bytes reach the disk)."""
    with open(filename, "wb") as f:
        f.write(serialize(tensors, metadata))


def save(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically write ``tensors`` with ``meta`` (JSON-encoded values) in the header."""
    path = Path(path)
    header = {"format_version": FORMAT_VERSION, "package_version": __version__}
    header.update({k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in meta.items()})
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header[DIGEST] = content_digest(cpu, header)
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=header), "checkpoint", CheckpointError)


def read_header(path: Path) -> dict:
    """The decoded metadata of a checkpoint; refuses anything that is not safetensors."""
    path = Path(path)
    if not path.is_file():
        if path.is_symlink():
            raise CheckpointError("checkpoint is a broken or looping symbolic link", path)
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
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint: {os_reason(e)}", path) from None
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


#: Settings a resume may change (e.g. a lower --lr after a non-finite loss): they do not shape the
#: model or its state. Stages pass ``may_differ={"config": RESUME_MAY_DIFFER}`` when loading a resume state.
RESUME_MAY_DIFFER = ("lr", "epochs", "patience", "save_every", "sharding")
#: Config keys added after runs were saved without them, with the value that behaves as those runs did: a saved
#: config that lacks one compares equal to a current config that has it at this value (resume, ablate's skip).
ADDED_CONFIG_KEYS = {"lr_decay": 1.0, "contrast_users": None, "sharding": "none"}


def with_added_keys(saved: dict, current: dict) -> dict:
    """``saved`` with the :data:`ADDED_CONFIG_KEYS` it predates filled in, where ``current`` has them."""
    missing = {k: v for k, v in ADDED_CONFIG_KEYS.items() if k in current and k not in saved}
    return {**saved, **missing}


def load(
    path: Path,
    *,
    stage: str,
    fingerprint: str | None = None,
    expect: dict | None = None,
    may_differ: dict[str, tuple[str, ...]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Load tensors and metadata, refusing another stage, dataset or shape.

    ``expect`` maps metadata keys to required values (e.g. {"dim": 128});
    every mismatch is named in a one-line error. ``may_differ`` names, per
    dict-valued key of ``expect``, entries left out of the comparison.
    """
    path = Path(path)
    meta = read_header(path)
    check_meta(meta, path, stage=stage, fingerprint=fingerprint, expect=expect, may_differ=may_differ)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"corrupt checkpoint ({str(e).splitlines()[0][:80]})", path) from None
    if DIGEST in meta:
        if content_digest(tensors, _raw_metadata(path)) != meta[DIGEST]:
            raise CheckpointError("corrupt checkpoint (content does not match its checksum)", path)
    check_finite(tensors, path)
    return Tensors(tensors, path), meta


def check_meta(
    meta: dict,
    path: Path,
    *,
    stage: str,
    fingerprint: str | None = None,
    expect: dict | None = None,
    may_differ: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """Refuse decoded checkpoint metadata of another format, stage, dataset, seed folder or ``expect``ed value
    (:func:`load`'s checks, also those of a DCP state's manifest), in one line naming ``path``."""
    if str(meta.get("format_version")) != FORMAT_VERSION:
        raise CheckpointError(f"unsupported checkpoint format {meta.get('format_version')!r}", path)
    if meta.get("stage") != stage:
        raise CheckpointError(f"checkpoint is of stage '{meta.get('stage')}', expected '{stage}'", path)
    if fingerprint is not None and meta.get("dataset") != fingerprint:
        raise CheckpointError("checkpoint was trained on another dataset (fingerprint differs)", path)
    folder = layout.seed_of(path.parent)
    if folder is not None and isinstance(meta.get("seed"), int) and meta["seed"] != folder:
        raise CheckpointError(f"checkpoint is of seed {meta['seed']} but lies in {path.parent.name}", path)
    for key, want in (expect or {}).items():
        got = meta.get(key)
        if key == "config" and isinstance(want, dict) and isinstance(got, dict):
            got = with_added_keys(got, want)
        loose = (may_differ or {}).get(key)
        if loose and isinstance(want, dict) and isinstance(got, dict):
            want = {k: v for k, v in want.items() if k not in loose}
            got = {k: v for k, v in got.items() if k not in loose}
        if got == want:
            continue
        if isinstance(want, dict) and isinstance(got, dict):
            diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            raise CheckpointError(f"checkpoint was made with other {key} ({', '.join(diff[:4])} differ)", path)
        if key.endswith("_sha256"):
            raise CheckpointError(
                f"checkpoint was made from another {key[: -len('_sha256')]} checkpoint ({key} differs)", path
            )
        raise CheckpointError(f"checkpoint has {key}={got!r}, expected {want!r}", path)


#: Tensors that may hold -inf: log u of users the contrastive moving average has not seen yet (log 0).
MAY_BE_MINUS_INF = ("log_u",)


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a checkpoint with NaN or infinite weights (a checksum only proves they were written so)."""
    for name in sorted(tensors):
        t = tensors[name]
        if not t.is_floating_point() or bool(torch.isfinite(t).all()):
            continue
        if name.rsplit(".", 1)[-1] in MAY_BE_MINUS_INF and not bool((torch.isnan(t) | (t == math.inf)).any()):
            continue
        kind = "NaN" if bool(torch.isnan(t).any()) else "infinite"
        raise CheckpointError(f"checkpoint tensor '{name}' holds {kind} values (the model diverged?)", path)


class Tensors(dict):
    """The tensors of a checkpoint; a missing one is a one-line :class:`CheckpointError` naming it."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: Path):
        super().__init__(tensors)
        self.path = path

    def __missing__(self, key: str):
        raise CheckpointError(f"checkpoint lacks tensor '{key}'", self.path)


def _raw_metadata(path: Path) -> dict:
    """The header's ``__metadata__`` strings exactly as stored (read_header decodes them)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)).get("__metadata__", {})


def write_json(path: Path, payload: dict) -> None:
    """Atomic JSON write (config, metrics summaries); a failed write leaves the old file."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
