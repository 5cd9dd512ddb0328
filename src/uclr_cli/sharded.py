"""PGE's tables sharded over ``torchrun``'s ranks with torchrec (``--sharding``, docs/distributed.md).

The user and item tables become one torchrec ``EmbeddingBagCollection`` under
``DistributedModelParallel``: table-wise (the user table on rank 0, the item
table on rank 1), column-wise (each table's columns split over the ranks) or
row-wise (each table's rows split over the ranks). The compute kernel is
torchrec's dense one, so every shard is a plain parameter that ``torch.optim.Adam``
steps, as the unsharded dense Adam does. The batch split is the data-parallel
one (:mod:`uclr_cli.distributed`): the same global permutation and negatives on
every rank, a contiguous share each, the loss divided by the global batch size;
torchrec sends each rank's rows to the shards' owners and brings the gradients
back summed (gradient division off). Validation and checkpoints use the whole
tables, gathered onto every rank (:func:`gather`), in the unsharded layout.

torchrec is an optional extra (``make install-distributed``): this module imports
it only inside :func:`require` and :func:`build`.
"""

from __future__ import annotations

import torch

from uclr_cli.errors import ConfigError

SHARDINGS = ("none", "table", "column", "row")
TABLES = ("user_emb", "item_emb")
#: The features torchrec looks up: the batch's users in the user table, positives and negatives in the item table.
FEATURES = {"user_emb": ["user"], "item_emb": ["pos", "neg"]}

INSTALL = (
    "pip install 'uclr-cli[distributed]' && pip install --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0 "
    "(or make install-distributed)"
)


def require(sharding: str, device: torch.device, world_size: int) -> None:
    """Refuse ``--sharding`` where it cannot run, in one line: torchrec missing, one process, or CUDA."""
    if sharding == "none":
        return
    try:
        import_torchrec()
    except ImportError as e:
        reason = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        raise ConfigError(f"--sharding {sharding} needs torchrec ({reason}): {INSTALL}", "--sharding") from None
    if device.type != "cpu":
        raise ConfigError(
            f"--sharding {sharding} runs on CPU (gloo) only: the extra installs fbgemm's CPU build "
            "(use --device cpu, or --sharding none for data-parallel CUDA)",
            "--sharding",
        )
    if world_size < 2:
        raise ConfigError(
            f"--sharding {sharding} splits the tables over torchrun's ranks: launch with "
            "torchrun --nproc-per-node N (N >= 2), or use --sharding none",
            f"WORLD_SIZE={world_size}",
        )


def import_torchrec():
    """torchrec's module (an ImportError when the extra is not installed); tests replace this."""
    import torchrec

    return torchrec


def split(n: int, parts: int) -> list[int]:
    """``n`` columns over ``parts`` ranks, the first ``n % parts`` one more (some may get 0)."""
    q, r = divmod(n, parts)
    return [q + (p < r) for p in range(parts)]


def build(sharding: str, n_users: int, n_items: int, user_dim: int, item_dim: int, world_size: int):
    """The sharded tables: torchrec's ``DistributedModelParallel`` over an ``EmbeddingBagCollection`` of
    ``user_emb`` (``user_dim`` columns) and ``item_emb`` (``item_dim``), dense kernel, on CPU. The shards
    start as torchrec's init; :func:`load` puts the run's initial tables in."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
    from torchrec.distributed import comm_ops
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, row_wise, table_wise
    from torchrec.distributed.types import ShardingPlan

    if sharding == "column" and user_dim < world_size:  # torchrec takes no empty shard
        raise ConfigError(f"--sharding column needs at least one column per rank ({world_size} ranks)", "--dim")
    comm_ops.set_gradient_division(False)  # the loss is already divided by the global batch: sum the gradients
    shapes = {"user_emb": (n_users, user_dim), "item_emb": (n_items, item_dim)}
    configs = [
        EmbeddingBagConfig(
            name=name,
            embedding_dim=cols,
            num_embeddings=rows,
            feature_names=FEATURES[name],
            pooling=PoolingType.SUM,
        )
        for name, (rows, cols) in shapes.items()
    ]
    ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    kernel = "dense"
    per_table = {}
    for t, name in enumerate(TABLES):
        if sharding == "table":
            per_table[name] = table_wise(rank=t % world_size, compute_kernel=kernel)
        elif sharding == "column":
            per_table[name] = column_wise(size_per_rank=split(shapes[name][1], world_size), compute_kernel=kernel)
        else:
            per_table[name] = row_wise(compute_kernel=kernel)
    sharder = EmbeddingBagCollectionSharder()
    plan = construct_module_sharding_plan(
        ebc, per_table, sharder=sharder, local_size=world_size, world_size=world_size, device_type="cpu"
    )
    return DistributedModelParallel(ebc, device=torch.device("cpu"), plan=ShardingPlan({"": plan}), sharders=[sharder])


def shards(model) -> dict[str, tuple[torch.Tensor, int, int]]:
    """This rank's shard of each table it holds: ``name -> (parameter, first row, first column)``."""
    params = dict(model.named_parameters())
    state = model.state_dict()
    out = {}
    for name in TABLES:
        key = f"embedding_bags.{name}.weight"
        local = state[key].local_shards()
        if len(local) > 1:  # the plans of build() give a rank one shard of a table at most
            raise RuntimeError(f"{name}: {len(local)} shards on one rank")
        if local and key in params and params[key].numel():
            p = params[key]
            if p.data_ptr() != local[0].tensor.data_ptr():
                raise RuntimeError(f"{name}: the parameter is not the shard")
            r0, c0 = local[0].metadata.shard_offsets
            out[name] = (p, r0, c0)
    return out


def load(model, tables: dict[str, torch.Tensor]) -> None:
    """Copy the whole tables (one process's layout, ``user_emb`` without a bias column) into the shards."""
    with torch.no_grad():
        for name, (p, r0, c0) in shards(model).items():
            p.copy_(tables[name][r0 : r0 + p.shape[0], c0 : c0 + p.shape[1]])


def gather(pieces: dict[str, tuple[torch.Tensor, int, int]], shapes: dict[str, tuple[int, int]], world) -> dict:
    """The whole tables on every rank from each rank's pieces ``name -> (tensor, row, column)``: zeros
    elsewhere, summed over the ranks (the shards do not overlap, so the sum is exact)."""
    out = {}
    for name, shape in shapes.items():
        full = torch.zeros(shape)
        if name in pieces:
            t, r0, c0 = pieces[name]
            full[r0 : r0 + t.shape[0], c0 : c0 + t.shape[1]] = t.detach()
        out[name] = world.sum_(full)
    return out


def adam_pieces(model, opt: torch.optim.Optimizer) -> tuple[dict[str, dict], torch.Tensor]:
    """This rank's Adam moments per field (``exp_avg``, ``exp_avg_sq``) as :func:`gather` pieces, and the step
    count (0 before the first step; the same on every rank holding a shard)."""
    fields: dict[str, dict] = {"exp_avg": {}, "exp_avg_sq": {}}
    step = torch.zeros(())
    for name, (p, r0, c0) in shards(model).items():
        st = opt.state.get(p)
        if not st:
            continue
        for f in fields:
            fields[f][name] = (st[f], r0, c0)
        step = st["step"].detach().clone().float().reshape(())
    return fields, step


def load_adam(model, opt: torch.optim.Optimizer, moments: dict[str, dict[str, torch.Tensor]], step: float) -> None:
    """Restore the Adam state of each shard from the whole moments (``field -> name -> table``)."""
    for name, (p, r0, c0) in shards(model).items():
        opt.state[p] = {
            "step": torch.tensor(float(step)),
            **{f: t[name][r0 : r0 + p.shape[0], c0 : c0 + p.shape[1]].clone() for f, t in moments.items()},
        }


def lookup(model, u: torch.Tensor, i: torch.Tensor, j: torch.Tensor, width: int):
    """The rows of this rank's share (users ``u``, positives ``i``, negatives ``j``), through the shards'
    owners. Every rank sends ``width`` ids a feature (its share padded with row 0), so torchrec sees the
    same batch size on every rank; the padding's rows are dropped before the loss and get no gradient."""
    from torchrec import KeyedJaggedTensor

    m = len(u)

    def pad(t):
        return torch.cat([t, torch.zeros(width - m, dtype=t.dtype)])

    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "pos", "neg"],
        values=torch.cat([pad(u), pad(i), pad(j)]),
        lengths=torch.ones(3 * width, dtype=torch.int32),
    )
    emb = model(kjt).to_dict()
    return emb["user"][:m], emb["pos"][:m], emb["neg"][:m]
