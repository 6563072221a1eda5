"""Custom ops: each has a PyTorch reference (the specification), a Triton kernel and a thin dispatcher
(HSTU attention also a batched PyTorch version for CPUs)."""

from models.ops.hstu_attention import AttentionImpl, hstu_attention
from models.ops.relative_bias import RelativeBias

__all__ = ["AttentionImpl", "RelativeBias", "hstu_attention"]
