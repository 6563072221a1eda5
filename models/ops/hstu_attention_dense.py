"""HSTU attention in PyTorch on the whole batch at once: padded to its longest sequence, dense masks.

The same function as ``hstu_attention_reference`` (which takes one sequence at a time, as the
specification) in a handful of batched ops instead of ~10 per sequence: the implementation for CPUs,
where the reference's per-sequence loop dominated a training step. Memory is B x H x N x N for the
batch's longest sequence N, so on GPUs the Triton kernel (jagged, no N x N) does the work.

Example::

    >>> from models.ops.hstu_attention_reference import hstu_attention_reference
    >>> q = k = v = torch.randn(5, 1, 8)
    >>> offsets = torch.tensor([0, 2, 5])
    >>> out = hstu_attention_dense(q, k, v, offsets, max_seq_len=3, alpha=1.0)
    >>> bool(torch.allclose(out, hstu_attention_reference(q, k, v, offsets, 3, 1.0), atol=1e-6))
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models import jagged
from models.ops.per_batch import cached
from models.ops.relative_bias import RelativeBias, gap_buckets


def hstu_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    rab: RelativeBias | None = None,
    num_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """See ``models.ops.hstu_attention``; same arguments, computed in fp32."""
    total, heads = q.shape[0], q.shape[1]
    lengths = seq_offsets.diff()
    n = int(lengths.max()) if lengths.numel() else 0
    if n > max_seq_len:
        raise ValueError(f"a sequence of length {n} exceeds max_seq_len={max_seq_len}")
    if total == 0 or n == 0:
        return torch.zeros(total, heads, v.shape[2], dtype=q.dtype, device=q.device)

    def padded(t: torch.Tensor) -> torch.Tensor:  # [L, H, d] -> [B, H, N, d]
        return jagged.to_padded(t.float(), seq_offsets, n).transpose(1, 2)

    scores = alpha * padded(q) @ padded(k).transpose(-1, -2)  # [B, H, N, N]
    if rab is not None:
        scores = scores + _bias(rab, seq_offsets, n, max_seq_len)[:, None]
    weights = F.silu(scores) * _allowed(lengths, num_targets, n)[:, None] / max_seq_len
    out = (weights @ padded(v)).transpose(1, 2)  # [B, N, H, dv]
    return jagged.from_padded(out, seq_offsets, total).to(q.dtype)


def _bias(rab: RelativeBias, seq_offsets: torch.Tensor, n: int, max_seq_len: int) -> torch.Tensor:
    """[B, N, N] relative position + time bias of every (query, key) pair of each padded sequence."""
    if rab.pos_weights.numel() < 2 * max_seq_len - 1:
        raise ValueError(f"pos_weights has {rab.pos_weights.numel()} entries; max_seq_len={max_seq_len} needs "
                         f"{2 * max_seq_len - 1}")
    idx = torch.arange(n, device=seq_offsets.device)
    position = rab.pos_weights[idx[None, :] - idx[:, None] + max_seq_len - 1]  # [N, N]
    def buckets() -> torch.Tensor:  # the same for every layer of the batch
        ts = jagged.to_padded(rab.timestamps, seq_offsets, n)  # [B, N]
        return gap_buckets(ts[:, :, None] - ts[:, None, :], rab.time_bucket_scale, rab.num_time_buckets)

    key = (n, rab.time_bucket_scale, rab.num_time_buckets)
    time = rab.time_weights[cached("dense-buckets", (rab.timestamps, seq_offsets), key, buckets)]  # [B, N, N]
    return (position + time).float()


def _allowed(lengths: torch.Tensor, num_targets: torch.Tensor | None, n: int) -> torch.Tensor:
    """[B, N, N] may query i attend key j: both inside the sequence, causal over the history, and each of
    the last ``num_targets`` tokens sees the history and itself only (``allowed_mask`` per sequence)."""
    i = torch.arange(n, device=lengths.device)[None, :, None]
    j = torch.arange(n, device=lengths.device)[None, None, :]
    size = lengths[:, None, None]
    targets = torch.zeros_like(lengths) if num_targets is None else num_targets.to(lengths.dtype)
    history = (lengths - targets).clamp(min=0)[:, None, None]
    inside = (i < size) & (j < size)
    return inside & torch.where(i >= history, (j < history) | (j == i), j <= i)
