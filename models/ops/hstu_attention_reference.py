"""Plain PyTorch HSTU attention: the specification the Triton kernel is tested against.

Written for clarity, one sequence at a time; autograd gives the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.ops.relative_bias import RelativeBias


def allowed_mask(n: int, num_targets: int, device: torch.device) -> torch.Tensor:
    """[n, n] bool: may query i attend key j? Causal over the history; each of the last
    ``num_targets`` tokens (candidates) sees the history and itself only."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    history = n - num_targets
    causal = j <= i
    is_target_row = i >= history
    return torch.where(is_target_row, (j < history) | (j == i), causal)


def hstu_attention_reference(
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
    # Rows outside every sequence (if seq_offsets does not cover [0, L)) are defined as 0.
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    offsets = seq_offsets.tolist()
    for b in range(len(offsets) - 1):
        start, end = offsets[b], offsets[b + 1]
        n = end - start
        if n > max_seq_len:
            raise ValueError(f"a sequence of length {n} exceeds max_seq_len={max_seq_len}")
        if n == 0:
            continue
        qb, kb, vb = (t[start:end].float().transpose(0, 1) for t in (q, k, v))  # [H, n, d]
        scores = alpha * qb @ kb.transpose(1, 2)  # [H, n, n]
        if rab is not None:
            scores = scores + rab.dense(start, end, max_seq_len).float()
        t = 0 if num_targets is None else int(num_targets[b])
        mask = allowed_mask(n, t, q.device)
        weights = F.silu(scores) * mask / max_seq_len
        out[start:end] = (weights @ vb).transpose(0, 1).to(q.dtype)
    return out
