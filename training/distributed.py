"""Everything about processes and sharding: process group, device, plan, DMP and optimizers.

This is the only module besides the pipeline that imports ``torchrec.distributed``.

Example (one process, CPU)::

    ctx = init_process_group("cpu")
    model = GenerativeRecommender(model_cfg, num_items, device=torch.device("meta"))
    dmp, plan = shard_model(model, ctx, sharding_cfg, optim_cfg)
    optimizer, scheduler = make_optimizer(dmp, optim_cfg)
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from training.config import OptimConfig, ShardingConfig, SparseOptimizer

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


def init_process_group(device: str = "auto") -> DistContext:
    """Joins (or, outside torchrun, creates a one-process) group: NCCL on CUDA, gloo on CPU."""
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
            timeout=datetime.timedelta(minutes=10),
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


def make_sharder(optim: OptimConfig, device: torch.device) -> EmbeddingCollectionSharder:
    """The embedding optimizer runs inside FBGEMM's backward (fused), so sparse gradients are never
    materialised; on CPU it is also the only kernel that works for EmbeddingCollection."""
    kind = sparse_optimizer_for(optim.sparse_optimizer, device)
    fused = {"optimizer": kind, "learning_rate": optim.sparse_lr or optim.lr, "eps": optim.sparse_eps}
    if kind is EmbOptimType.ADAM:
        fused.update(beta1=optim.betas[0], beta2=optim.betas[1], weight_decay=optim.weight_decay)
    return EmbeddingCollectionSharder(fused_params=fused)


def shard_model(
    model: torch.nn.Module, ctx: DistContext, sharding: ShardingConfig, optim: OptimConfig
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plans the embedding tables over the ranks and wraps the model in DMP.

    ``model`` should be built on the meta device; DMP materialises each shard on its rank.
    """
    constraints = {
        table: ParameterConstraints(
            sharding_types=[kind.value], compute_kernels=[EmbeddingComputeKernel.FUSED.value]
        )
        for table, kind in sharding.tables.items()
    }
    for name, _ in _embedding_tables(model):
        constraints.setdefault(name, ParameterConstraints(compute_kernels=[EmbeddingComputeKernel.FUSED.value]))
    sharder = make_sharder(optim, ctx.device)
    planner = EmbeddingShardingPlanner(
        topology=Topology(
            world_size=ctx.world_size,
            compute_device=ctx.device.type,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)),
        ),
        constraints=constraints,
    )
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=ctx.device, plan=plan, sharders=[sharder])
    return dmp, plan


def make_optimizer(
    dmp: DistributedModelParallel, optim: OptimConfig
) -> tuple[CombinedOptimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW for the dense weights next to the fused embedding optimizer, as one KeyedOptimizer
    (so one ``state_dict`` checkpoints both), plus a linear warmup for the dense learning rate."""
    # Everything under a sharded module belongs to the fused optimizer, also on a rank that holds no
    # shard of some table (its fused optimizer does not list that table; AdamW must not take it either).
    sharded = tuple(f"{path}." for path in dmp.plan.plan)
    dense_params = {k: p for k, p in dmp.named_parameters() if not k.startswith(sharded) and p.requires_grad}
    adamw = torch.optim.AdamW(
        list(dense_params.values()), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
    )
    if optim.grad_clip > 0:
        # The train pipeline calls step() right after backward; a pre-step hook is the one place
        # between the two where clipping fits without re-implementing the pipeline's progress().
        params = list(dense_params.values())
        adamw.register_step_pre_hook(lambda *_: torch.nn.utils.clip_grad_norm_(params, optim.grad_clip))
    dense = KeyedOptimizerWrapper(dense_params, lambda _: adamw)
    warmup = max(optim.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    return CombinedOptimizer([("sparse", dmp.fused_optimizer), ("dense", dense)]), scheduler


def describe_plan(plan: ShardingPlan) -> str:
    """One line per table: sharding type and ranks, for the log."""
    lines = []
    for module, params in plan.plan.items():
        for table, spec in params.items():  # type: ignore[union-attr]
            ranks = sorted({r for r in (spec.ranks or [])})
            lines.append(f"{module}.{table}: {spec.sharding_type} on ranks {ranks}")
    return "\n".join(lines)


def _embedding_tables(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from torchrec.modules.embedding_modules import EmbeddingCollection

    out = []
    for m in model.modules():
        if isinstance(m, EmbeddingCollection):
            out.extend((cfg.name, m) for cfg in m.embedding_configs())
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cleanup() -> None:
    """Tear down the process group. Callers must drop the pipeline, optimizers and model (and
    gc.collect()) first: with gloo, a live reference at exit aborts about one run in five."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
