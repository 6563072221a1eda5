"""Everything about processes and sharding: process group, device, plan, DMP and optimizers.

This is the only module besides the pipeline that imports ``torchrec.distributed``.

Example (one process, CPU)::

    ctx = init_process_group("cpu")
    model = GenerativeRecommender(model_cfg, num_items, device=ctx.device, table_device=torch.device("meta"))
    dmp, plan = shard_model(model, ctx, sharding_cfg, optim_cfg)
    optimizer, scheduler = make_optimizer(dmp, optim_cfg)
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import HardwareConfig, KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from training.config import EmbeddingKernel, OptimConfig, ShardingConfig, ShardingKind, SparseOptimizer
from training.optimizers import RowWiseAdagrad

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_process_group(device: str = "auto", timeout_s: int = 600) -> DistContext:
    """Joins (or, outside torchrun, creates a one-process) group: NCCL on CUDA, gloo on CPU.

    ``timeout_s`` bounds every collective: a rank that died or took another path fails the others
    after that long instead of leaving them waiting.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but CUDA is not available")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def sparse_optimizer_for(kind: SparseOptimizer, device: torch.device) -> EmbOptimType:
    if kind is SparseOptimizer.AUTO:
        kind = SparseOptimizer.ADAM if device.type == "cuda" else SparseOptimizer.ROWWISE_ADAGRAD
    if kind is SparseOptimizer.ADAM and device.type != "cuda":
        raise ValueError("FBGEMM's fused Adam runs on CUDA only; on CPU use rowwise_adagrad, exact_adagrad or sgd")
    return {
        SparseOptimizer.ADAM: EmbOptimType.ADAM,
        SparseOptimizer.ROWWISE_ADAGRAD: EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        SparseOptimizer.EXACT_ADAGRAD: EmbOptimType.EXACT_ADAGRAD,
        SparseOptimizer.SGD: EmbOptimType.EXACT_SGD,
    }[kind]


def make_sharder(
    optim: OptimConfig, device: torch.device, cache_load_factor: float = 0.2, host_tables: bool = False
) -> EmbeddingCollectionSharder:
    """The embedding optimizer runs inside FBGEMM's backward (fused), so sparse gradients are never
    materialised; on CPU it is also the only kernel that works for EmbeddingCollection.

    ``host_tables``: some table lives in host memory (a UVM kernel). FBGEMM then allocates it pinned and
    mapped (``cudaHostAlloc``), not as CUDA managed memory, which oversubscribed can stall the GPU.
    """
    kind = sparse_optimizer_for(optim.sparse_optimizer, device)
    fused = {"optimizer": kind, "learning_rate": optim.sparse_lr or optim.lr, "eps": optim.sparse_eps,
             "cache_load_factor": cache_load_factor}
    if host_tables:
        fused["uvm_host_mapped"] = True
    if kind is EmbOptimType.ADAM:
        fused.update(beta1=optim.betas[0], beta2=optim.betas[1], weight_decay=optim.weight_decay)
    return EmbeddingCollectionSharder(fused_params=fused)


def shard_model(
    model: torch.nn.Module, ctx: DistContext, sharding: ShardingConfig, optim: OptimConfig
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plans the embedding tables over the ranks and wraps the model in DMP.

    ``model``'s tables should be built on the meta device; DMP materialises each shard on its rank.
    The dense part is replicated under DDP. DDP averages the ranks' dense gradients and TorchRec's
    all-to-all backward averages the embedding gradients the same way (its "gradient division"), so
    each rank's loss is scaled to make that average the global batch's gradient
    (``training.train.global_mean_loss``).
    """
    tables = [cfg for m in model.modules() if isinstance(m, EmbeddingCollection) for cfg in m.embedding_configs()]
    unknown = (set(sharding.tables) | set(sharding.kernels)) - {t.name for t in tables}
    if unknown:
        raise ValueError(f"sharding names unknown table(s) {sorted(unknown)}; the model has "
                         f"{sorted(t.name for t in tables)}")
    host_tables = any(k is not EmbeddingKernel.FUSED for k in sharding.kernels.values())
    sharder = make_sharder(optim, ctx.device, sharding.cache_load_factor, host_tables)
    device_bytes = _device_memory(ctx, sharding)
    if sharding.device_memory_gb > 0 and ctx.device.type == "cuda":  # held to it, not only planned for it
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, device_bytes / total), ctx.device)
    planner = EmbeddingShardingPlanner(
        topology=_topology(ctx, device_bytes),
        constraints={t.name: _constraints(t, sharding, ctx) for t in tables},
        storage_reservation=FixedPercentageStorageReservation(sharding.reserved_fraction),
    )
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    inits = {f"embeddings.{t.name}.weight": t.init_fn for t in tables}
    dmp = DistributedModelParallel(model, device=ctx.device, plan=plan, sharders=[sharder])
    _initialise_tables(dmp, inits)
    return dmp, plan


def _initialise_tables(dmp: DistributedModelParallel, inits: dict[str, Callable]) -> None:
    """Runs each table's ``init_fn`` again on its shards as the state dict holds them.

    TorchRec hands ``init_fn`` only a rank's local slice of a sharded table, without its place in the
    table, so a row-wise rank 1 would draw rows 0.. again. The state dict's ShardedTensors carry each
    shard's offsets, which the tables' init needs to give every row the same initial value on any
    number of ranks (``models.embeddings.init_table_rows``).
    """
    state = dmp.state_dict()
    for key, weight in state.items():
        init = next((fn for suffix, fn in inits.items() if key.endswith(suffix)), None)
        if init is not None:
            init(weight)
    dmp.load_state_dict(state)


def _constraints(table_config: EmbeddingConfig, sharding: ShardingConfig, ctx: DistContext) -> ParameterConstraints:
    table, device = table_config.name, ctx.device
    kind = sharding.tables.get(table)
    if kind is ShardingKind.DATA_PARALLEL:
        if device.type != "cuda":
            raise ValueError(
                f"sharding.tables.{table}=data_parallel needs CUDA: on CPU, FBGEMM's dense kernel (the only one "
                "TorchRec allows for data_parallel) pools sequence lookups although asked not to "
                "(pytorch/FBGEMM#4586), returning one row per history instead of one per event. On CPU use "
                "table_wise, row_wise or column_wise.")
        if table in sharding.kernels:
            raise ValueError(f"{table} is data_parallel, whose only kernel is TorchRec's dense one; "
                             f"drop sharding.kernels.{table}")
        return ParameterConstraints(sharding_types=[kind.value], compute_kernels=[EmbeddingComputeKernel.DENSE.value])
    kernel = sharding.kernels.get(table, EmbeddingKernel.FUSED)
    if kernel is not EmbeddingKernel.FUSED and device.type != "cuda":
        raise ValueError(f"sharding.kernels.{table}={kernel.value} keeps the table in host memory for a GPU; "
                         "on CPU the table is in host memory already: use fused")
    # Without a sharding type the planner chooses among the model-parallel ones (data_parallel has no
    # fused kernel, and asking it for one only fills the log with warnings).
    types = [kind.value] if kind else [k.value for k in ShardingKind if k is not ShardingKind.DATA_PARALLEL]
    # Column-wise: one shard per rank (TorchRec's default keeps shards >= 128 wide, so a d=128 table would
    # stay whole on one rank); FBGEMM wants widths that are multiples of 4.
    width = math.ceil(math.ceil(table_config.embedding_dim / ctx.world_size) / 4) * 4
    return ParameterConstraints(sharding_types=types, compute_kernels=[kernel.value], min_partition=width)


def _device_memory(ctx: DistContext, sharding: ShardingConfig) -> int:
    """Bytes of device memory per rank: the configured amount, else the card's (on CPU: the host's)."""
    if sharding.device_memory_gb > 0:
        return int(sharding.device_memory_gb * 2**30)
    if ctx.device.type == "cuda":
        return torch.cuda.get_device_properties(ctx.device).total_memory
    return _host_memory(ctx)


def _host_memory(ctx: DistContext) -> int:
    """This rank's share of the host's memory (the local ranks share it)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // local_world


def _topology(ctx: DistContext, device_bytes: int):
    """The planner's view of one rank: its device memory and its share of the host's, instead of
    TorchRec's defaults (32 GB of HBM)."""
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=ctx.world_size,
                                     local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))),
        hardware_config=HardwareConfig(hbm_cap_bytes=device_bytes, ddr_cap_bytes=_host_memory(ctx)),
        kernel_config=KernelConfig(compute_device=ctx.device.type),
    )


def make_optimizer(
    dmp: DistributedModelParallel, optim: OptimConfig
) -> tuple[CombinedOptimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW for the dense weights next to the fused embedding optimizer, as one KeyedOptimizer
    (so one ``state_dict`` checkpoints both), plus a linear warmup for the dense learning rate.

    A data-parallel table is a plain replicated weight (TorchRec's dense kernel, outside FBGEMM's
    fused update): it gets the embedding optimizer's rule as a torch optimizer of its own.
    """
    sharded = tuple(f"{path}." for path in dmp.plan.plan)
    # A sharded module's parameters belong to the fused optimizer also on a rank that holds no shard of
    # some table (its fused optimizer does not list that table; AdamW must not take it either); the
    # exceptions are data-parallel tables, which every rank holds whole.
    data_parallel = {k: p for k, p in dmp.named_parameters() if _is_data_parallel(dmp, k)}
    dense_params = {k: p for k, p in dmp.named_parameters()
                    if not k.startswith(sharded) and p.requires_grad}
    adamw = torch.optim.AdamW(
        list(dense_params.values()), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
    )
    if optim.grad_clip > 0:
        # The train pipeline calls step() right after backward; a pre-step hook is the one place
        # between the two where clipping fits without re-implementing the pipeline's progress().
        params = list(dense_params.values())
        adamw.register_step_pre_hook(lambda *_: torch.nn.utils.clip_grad_norm_(params, optim.grad_clip))
    parts = [("sparse", dmp.fused_optimizer), ("dense", KeyedOptimizerWrapper(dense_params, lambda _: adamw))]
    if data_parallel:
        parts.append(("replicated", KeyedOptimizerWrapper(
            data_parallel, lambda params: _embedding_optimizer(list(params), optim, dmp.device))))
    warmup = max(optim.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    return CombinedOptimizer(parts), scheduler


def _is_data_parallel(dmp: DistributedModelParallel, name: str) -> bool:
    for path, tables in dmp.plan.plan.items():
        for table, spec in tables.items():  # type: ignore[union-attr]
            if name.startswith(f"{path}.") and f".{table}." in name:
                return spec.sharding_type == ShardingKind.DATA_PARALLEL.value
    return False


def _embedding_optimizer(params: list[torch.Tensor], optim: OptimConfig, device: torch.device):
    """The fused embedding update (``make_sharder``) as a torch optimizer, for data-parallel tables."""
    kind = sparse_optimizer_for(optim.sparse_optimizer, device)
    lr, eps = optim.sparse_lr or optim.lr, optim.sparse_eps
    if kind is EmbOptimType.ADAM:
        return torch.optim.Adam(params, lr=lr, betas=optim.betas, eps=eps, weight_decay=optim.weight_decay)
    if kind is EmbOptimType.EXACT_ROWWISE_ADAGRAD:
        return RowWiseAdagrad(params, lr=lr, eps=eps)
    if kind is EmbOptimType.EXACT_ADAGRAD:
        return torch.optim.Adagrad(params, lr=lr, eps=eps)
    return torch.optim.SGD(params, lr=lr)


def describe_plan(plan: ShardingPlan) -> str:
    """One line per table: sharding type and ranks, for the log."""
    lines = []
    for module, params in plan.plan.items():
        for table, spec in params.items():  # type: ignore[union-attr]
            ranks = sorted({r for r in (spec.ranks or [])})
            lines.append(f"{module}.{table}: {spec.sharding_type} on ranks {ranks}")
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_shared_directory(path: Path, ctx: DistContext) -> None:
    """Fails on every rank, with the ranks that cannot see it, unless all ranks see ``path`` as one
    directory. Checkpoints are written by all ranks, renamed by rank 0 and read back by all (DCP reads
    every rank's shards when it reshards), so on several nodes ``run.out_dir`` must be a shared filesystem.
    """
    if ctx.world_size == 1:
        return
    token = [uuid.uuid4().hex if ctx.is_main else ""]
    dist.broadcast_object_list(token, src=0)
    probe = path / f".shared-{token[0]}"
    if ctx.is_main:
        probe.write_text(token[0])
    dist.barrier()
    seen = probe.is_file() and probe.read_text() == token[0]
    blind = [None] * ctx.world_size
    dist.all_gather_object(blind, None if seen else f"rank {ctx.rank} on {socket.gethostname()}")
    dist.barrier()
    if ctx.is_main:
        probe.unlink()
    missing = [b for b in blind if b]
    if missing:
        raise RuntimeError(f"{path} is not shared by all ranks: {', '.join(missing)} cannot see what rank 0 wrote "
                           "there. Checkpoints need one directory that every rank reads and writes: set "
                           "run.out_dir to a filesystem shared by all nodes (NFS, Lustre, ...).")


def cleanup(ok: bool = True) -> None:
    """Tear down the process group. Callers must drop the pipeline, optimizers and model (and
    gc.collect()) first: with gloo, a live reference at exit aborts about one run in five.

    After a failure (``ok=False``) there is no barrier: the other ranks may be stuck in some other
    collective, and this rank must exit so that torchrun stops them, rather than wait for them.
    """
    if dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()
