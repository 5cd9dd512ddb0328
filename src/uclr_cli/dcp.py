"""Checkpoints through torch.distributed.checkpoint (DCP) while data-parallel: every rank writes its rows,
any world size reads them back, and :func:`consolidate` turns them into the usual safetensors pair.

A seed's DCP state is a folder beside its safetensors files (``seed-<s>/pretrain.dcp``)::

    pretrain.dcp/manifest.json          what the pair's headers hold, the tensors' shapes, a content digest,
                                        and the generation folder that holds the tensors
    pretrain.dcp/state-<k>/shard-*.safetensors   one file per rank: its rows of every table

It holds both files of :class:`uclr_cli.loop.Outputs`: the resume state (tensors as in
``*.resume.safetensors``) and the best checkpoint so far (its tensors under ``best.``). Tables (every tensor
with rows, i.e. all but the generator state and step counters) are row-sharded over the ranks as DTensors
(``Shard(0)``); the rest is written once. The storage is DCP's safetensors writer and reader
(``HuggingFaceStorageWriter``/``Reader``): no pickle is written, and none is read, because the reader builds
DCP's metadata from the safetensors headers. A DCP folder in DCP's default format (``.metadata``, a pickle,
and ``*.distcp`` files) is not read at all.

Writes are atomic: the ranks write a hidden ``.state.tmp-<pid>`` folder, then rank 0 renames it to a new
``state-<k>`` and atomically replaces ``manifest.json`` to name it, then removes older generations. A kill
at any point leaves the manifest naming a complete generation (or no manifest, the first time).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from uclr_cli import __version__, distributed
from uclr_cli import checkpoint as ckpt
from uclr_cli.errors import CheckpointError, os_reason
from uclr_cli.files import atomic_write

MANIFEST = "manifest.json"
FORMAT = "uclr-dcp"
FORMAT_VERSION = "1"
BEST = "best."  # the prefix of the best checkpoint's tensors in the state dict
#: Tensors written once rather than row-sharded: not tables (the generator state, the optimizer's step counters).
REPLICATED_PREFIXES = ("rng", "opt.step")


def is_sharded(name: str, t: torch.Tensor) -> bool:
    return t.dim() >= 1 and not name.startswith(REPLICATED_PREFIXES)


_MESH = {}


def _mesh(world: distributed.World, device: torch.device):
    """The 1-D device mesh of every rank (over the default process group), made once per process."""
    key = (world.size, device.type, id(world.group))
    if key not in _MESH:
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        if world.group is None:
            _MESH[key] = init_device_mesh(device.type, (world.size,))
        else:
            _MESH[key] = DeviceMesh.from_group(world.group, device.type)
    return _MESH[key]


def _shard(t: torch.Tensor, world: distributed.World):
    """This rank's rows of ``t`` (a DTensor sharded by rows, ``torch.chunk`` layout), from its own full copy."""
    from torch.distributed.tensor import Shard, distribute_tensor

    return distribute_tensor(t.detach(), _mesh(world, t.device), [Shard(0)], src_data_rank=None)


def save(
    folder: Path,
    world: distributed.World,
    state: dict[str, torch.Tensor],
    state_meta: dict,
    best: dict[str, torch.Tensor] | None = None,
    best_meta: dict | None = None,
) -> None:
    """Write the resume state ``state`` (and the best checkpoint ``best``) into ``folder``; every rank calls it
    with its full (identical) copy and writes its rows (one process: one file). ``*_meta``: what the
    safetensors headers would hold."""
    from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageWriter
    from torch.distributed.checkpoint import save as dcp_save

    folder = Path(folder)
    full = {**state, **{BEST + k: v for k, v in (best or {}).items()}}
    dev = next((v.device for k, v in full.items() if is_sharded(k, v)), torch.device("cpu"))  # NCCL: on CUDA
    pid = torch.zeros(1, dtype=torch.int64, device=dev)
    if world.main:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot write DCP state: {os_reason(e)}", folder) from None
        pid[0] = os.getpid()
    world.sum_(pid)  # rank 0's pid names the temporary folder
    tmp = folder / f".state.tmp-{int(pid)}"
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    world.sum_(torch.zeros(1, device=dev))  # the folder exists before any rank writes into it
    sd = {k: _shard(v, world) if world.size > 1 and is_sharded(k, v) else v.detach() for k, v in full.items()}
    writer = HuggingFaceStorageWriter(str(tmp), save_distributed=True)
    try:
        with _quiet():
            dcp_save(sd, storage_writer=writer, process_group=world.group, no_dist=world.size == 1)
    except (Exception, CheckpointException) as e:  # the ranks' results are gathered: one failed write fails all
        raise CheckpointError(f"cannot write DCP state ({_reason(e)})", folder) from None
    if not world.main:
        return
    cpu = {k: v.detach().contiguous().cpu() for k, v in full.items()}
    head = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "world_size": world.size,
        "state_meta": _jsonable(state_meta),
        "best_meta": _jsonable(best_meta) if best is not None else None,
        "tensors": {
            k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape), "sharded": is_sharded(k, v)}
            for k, v in sorted(cpu.items())
        },
    }
    # a new name, so that the generation the manifest names now stays whole until the manifest names this one
    taken = [int(p.name[6:]) for p in folder.glob("state-*") if p.name[6:].isdigit()]
    generation = f"state-{max(taken, default=0) + 1}"
    head["generation"] = generation
    head[ckpt.DIGEST] = ckpt.content_digest(cpu, {k: v for k, v in head.items() if k != "generation"})
    try:
        tmp.rename(folder / generation)
        atomic_write(
            folder / MANIFEST, lambda p: p.write_text(json.dumps(head, indent=1, sort_keys=True)), "DCP manifest"
        )
    except OSError as e:
        raise CheckpointError(f"cannot write DCP state: {os_reason(e)}", folder) from None
    for p in folder.iterdir():  # older generations and leftovers of killed saves
        if p.name not in (MANIFEST, generation) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _quiet():
    """DCP warns, on every call in one process, that it assumes one process: that is what we ask for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _jsonable(meta: dict | None) -> dict | None:
    """The metadata as the safetensors header would decode it (JSON values), so it round-trips unchanged."""
    if meta is None:
        return None
    return {k: json.loads(json.dumps(v)) for k, v in meta.items()}


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[-1] if text else type(e).__name__)[:120]


def _read(path: Path, folder: Path) -> dict:
    try:
        head = json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"cannot read DCP manifest: {os_reason(e)}", path) from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError("not a uclr DCP state (unreadable manifest.json)", folder) from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise CheckpointError("not a uclr DCP state (manifest.json is not uclr's)", folder)
    if str(head.get("format_version")) != FORMAT_VERSION:
        raise CheckpointError(f"unsupported DCP state format {head.get('format_version')!r}", folder)
    gen, tensors = head.get("generation"), head.get("tensors")
    if not (isinstance(gen, str) and gen.startswith("state-") and gen[6:].isdigit() and isinstance(tensors, dict)):
        raise CheckpointError("not a uclr DCP state (manifest.json lacks its generation or tensors)", folder)
    if not isinstance(head.get("state_meta"), dict):
        raise CheckpointError("not a uclr DCP state (manifest.json has no resume metadata)", folder)
    return head


def manifest(folder: Path) -> dict:
    """The manifest of a DCP state folder (checked to be uclr's; its tensors are not read)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        if (folder / ".metadata").is_file():
            raise CheckpointError(
                "a DCP folder in torch's default format (pickle .metadata) is not read; uclr reads its own", folder
            )
        raise CheckpointError("not a uclr DCP state (no manifest.json; an unfinished first save?)", folder)
    return _read(folder / MANIFEST, folder)


def saved_at(folder: Path) -> float:
    """When the DCP state was last saved (its manifest's mtime), -inf when it has none."""
    try:
        return (Path(folder) / MANIFEST).stat().st_mtime
    except OSError:
        return float("-inf")


def load(
    folder: Path,
    world: distributed.World = distributed.SINGLE,
    device: torch.device | str = "cpu",
    *,
    stage: str,
    fingerprint: str | None = None,
    expect: dict | None = None,
    may_differ: dict[str, tuple[str, ...]] | None = None,
) -> tuple[ckpt.Tensors, dict, ckpt.Tensors | None, dict | None]:
    """Read a DCP state at this world size (any, one process included): ``(state, state_meta, best,
    best_meta)``, full tensors on every rank. The manifest is checked first, as a resume state's header is
    (``stage`` is the resume state's, e.g. ``pretrain-resume``); then each rank reads its rows, the rows are
    gathered, and the content digest is checked."""
    from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageReader
    from torch.distributed.checkpoint import load as dcp_load

    folder, device = Path(folder), torch.device(device)
    head = manifest(folder)
    meta = {**head["state_meta"], "format_version": head["format_version"]}
    ckpt.check_meta(meta, folder, stage=stage, fingerprint=fingerprint, expect=expect, may_differ=may_differ)
    gen = folder / head["generation"]
    if not gen.is_dir():
        raise CheckpointError(f"corrupt DCP state ({head['generation']} is missing)", folder)
    sd: dict = {}
    try:
        for name, spec in head["tensors"].items():
            t = torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]), device=device)
            sd[name] = _shard(t, world) if world.size > 1 and spec["sharded"] else t
        reader = HuggingFaceStorageReader(str(gen))
        with _quiet():
            dcp_load(sd, storage_reader=reader, process_group=world.group, no_dist=world.size == 1)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # a missing or damaged shard file, a tensor the files lack
        raise CheckpointError(f"corrupt DCP state ({_reason(e)})", folder) from None
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sd.items()}
    digest = ckpt.content_digest(
        {k: v.cpu() for k, v in full.items()}, {k: v for k, v in head.items() if k not in ("generation",)}
    )
    if digest != head.get(ckpt.DIGEST):
        raise CheckpointError("corrupt DCP state (content does not match its checksum)", folder)
    ckpt.check_finite(full, folder)
    state = {k: v for k, v in full.items() if not k.startswith(BEST)}
    best = {k[len(BEST) :]: v for k, v in full.items() if k.startswith(BEST)}
    best_meta = head.get("best_meta")
    return (
        ckpt.Tensors(state, folder),
        head["state_meta"],
        ckpt.Tensors(best, folder) if best_meta is not None else None,
        best_meta,
    )


def consolidate(folder: Path, best_path: Path, state_path: Path) -> dict:
    """Write the DCP state in ``folder`` as the two safetensors files one process writes (``best_path`` only
    when the state holds a best checkpoint), then remove ``folder``; returns the manifest. One process."""
    head = manifest(folder)
    meta = head["state_meta"]
    state, meta, best, best_meta = load(folder, stage=str(meta.get("stage")))
    if best is not None:
        ckpt.save(best_path, dict(best), best_meta)
    ckpt.save(state_path, dict(state), meta)
    remove(folder)
    return head


def remove(folder: Path) -> None:
    """Remove a superseded DCP state: its manifest first, so a kill midway leaves no state that looks whole."""
    folder = Path(folder)
    with contextlib.suppress(FileNotFoundError):
        (folder / MANIFEST).unlink()
    shutil.rmtree(folder, ignore_errors=True)


def consolidate_run(run_dir: Path, fingerprint: str | None = None) -> list[tuple[Path, dict]]:
    """:func:`consolidate` every DCP state of a run folder (``seed-*/*.dcp``): ``(folder, manifest)`` each.

    ``fingerprint``: the dataset the run records; a state of another dataset is refused. A state older than
    the safetensors resume state beside it (a kill between a save and the removal it supersedes) is refused.
    """
    from uclr_cli import layout
    from uclr_cli.errors import DataError

    found = [f for _, sd in layout.find_seeds(run_dir) for f in sorted(sd.glob("*.dcp")) if f.is_dir()]
    if not found:
        raise DataError(
            "no DCP state to consolidate (a data-parallel run keeps seed-*/pretrain.dcp until it ends)", run_dir
        )
    done = []
    for folder in found:
        head = manifest(folder)
        best_path = folder.with_name(folder.name.removesuffix(".dcp") + ".safetensors")
        state_path = best_path.with_name(layout.resume_name(best_path.name))
        if fingerprint is not None and head["state_meta"].get("dataset") != fingerprint:
            raise CheckpointError(
                "DCP state was trained on another dataset than the run's (fingerprint differs)", folder
            )
        if state_path.is_file() and state_path.stat().st_mtime > saved_at(folder):
            raise CheckpointError(f"DCP state is older than {state_path.name}; remove the folder", folder)
        done.append((folder, consolidate(folder, best_path, state_path)))
    return done
