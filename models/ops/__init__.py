"""Custom ops: each has a PyTorch reference, a Triton kernel and a thin dispatcher."""

from models.ops.hstu_attention import AttentionImpl, hstu_attention
from models.ops.relative_bias import RelativeBias

__all__ = ["AttentionImpl", "RelativeBias", "hstu_attention"]
