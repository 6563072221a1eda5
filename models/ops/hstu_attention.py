"""The HSTU attention op: one entry point; behind it a Triton kernel (GPUs) and a batched PyTorch
implementation (CPUs), both tested against the one-sequence-at-a-time reference.

Example::

    >>> q = k = v = torch.randn(5, 1, 8)
    >>> offsets = torch.tensor([0, 2, 5])
    >>> hstu_attention(q, k, v, offsets, max_seq_len=3, alpha=1.0).shape
    torch.Size([5, 1, 8])
"""

from __future__ import annotations

import os
from enum import StrEnum

import torch

from models.ops.hstu_attention_dense import hstu_attention_dense
from models.ops.relative_bias import RelativeBias


class AttentionImpl(StrEnum):
    AUTO = "auto"
    TRITON = "triton"
    PYTORCH = "pytorch"


def resolve_impl(impl: str | AttentionImpl, device: torch.device) -> AttentionImpl:
    """"auto" is Triton on CUDA and PyTorch elsewhere; "triton" on CPU needs TRITON_INTERPRET=1."""
    impl = AttentionImpl(impl)
    if impl is AttentionImpl.AUTO:
        return AttentionImpl.TRITON if device.type == "cuda" else AttentionImpl.PYTORCH
    if impl is AttentionImpl.TRITON and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl='triton' on a CPU tensor runs in Triton's interpreter: set TRITON_INTERPRET=1")
    return impl


def tuning_length(longest: int) -> int:
    """The autotuning bucket of a batch whose longest sequence has ``longest`` tokens: the next power
    of two, 16 at least. The Triton kernels are tuned for a bucket on its first batch (on a GPU about
    a second), which is why a server runs one batch per bucket before serving (``Engine.warm_up``).

    >>> [tuning_length(n) for n in (1, 16, 17, 200)]
    [16, 16, 32, 256]
    """
    return max(16, 1 << (max(longest, 1) - 1).bit_length())


def tuning_lengths(max_len: int) -> list[int]:
    """Every bucket (``tuning_length``) of batches no longer than ``max_len``.

    >>> tuning_lengths(200)
    [16, 32, 64, 128, 256]
    """
    out = [16]
    while out[-1] < tuning_length(max_len):
        out.append(out[-1] * 2)
    return out


def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    *,
    rab: RelativeBias | None = None,
    num_targets: torch.Tensor | None = None,
    impl: str | AttentionImpl = AttentionImpl.AUTO,
) -> torch.Tensor:
    """Jagged causal HSTU attention: per sequence, ``SiLU(alpha * Q K^T + bias) / max_seq_len @ V``.

    Args:
        q, k: [L, H, Dqk]; v: [L, H, Dv], L the batch's total tokens.
        seq_offsets: int64 [B+1], sequence b is rows seq_offsets[b]:seq_offsets[b+1].
        max_seq_len: the longest sequence allowed; also the normaliser of the attention weights.
        alpha: scale of Q K^T.
        rab: relative position/time bias (parameters + timestamps), or None.
        num_targets: int [B] or None; the last num_targets[b] tokens of sequence b attend to the
            history and to themselves only.
        impl: "triton", "pytorch" (``hstu_attention_dense``) or "auto".

    Returns:
        [L, H, Dv].
    """
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"expected q, k [L, H, D] and v [L, H, Dv]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if resolve_impl(impl, q.device) is AttentionImpl.TRITON:
        from models.ops.hstu_attention_triton import hstu_attention_triton

        return hstu_attention_triton(q, k, v, seq_offsets, max_seq_len, alpha, rab=rab, num_targets=num_targets)
    return hstu_attention_dense(q, k, v, seq_offsets, max_seq_len, alpha, rab=rab, num_targets=num_targets)
