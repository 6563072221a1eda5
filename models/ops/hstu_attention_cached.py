"""HSTU attention of new tokens against a cached prefix (the "delta" of a sequence): one entry point,
a PyTorch reference (the specification), a batched PyTorch version and a Triton kernel behind it.

For each of B sequences, ``m_b`` new tokens (jagged, ``seq_offsets``) follow ``n_b`` cached ones (their
keys and values in ``CachedPrefix``). New token i sits at position ``n_b + i`` and attends to every
cached key and to the new keys up to itself::

    out_i = sum_{j <= n_b + i} SiLU(alpha * q_i . k_j + bias(n_b + i, j)) / max_seq_len * v_j

which is exactly what ``hstu_attention`` computes for the last ``m_b`` rows of the whole sequence
(the reference is written that way: ``allowed_mask`` and ``RelativeBias.dense`` of the full op).
Prefixes are addressed by range, so several sequences may read the same cached rows: K candidates
scored after one user's history are K sequences of one new token over one shared prefix.

Inference only (no backward): training always runs the full op over whole sequences.

Example::

    >>> from models.ops import hstu_attention
    >>> q = k = v = torch.randn(5, 1, 8)                     # one sequence of 5 tokens
    >>> full = hstu_attention(q, k, v, torch.tensor([0, 5]), max_seq_len=8, alpha=1.0)
    >>> prefix = CachedPrefix(k[:3], v[:3], torch.zeros(3, dtype=torch.int64), torch.tensor([0]), torch.tensor([3]))
    >>> new = hstu_attention_cached(q[3:], k[3:], v[3:], torch.tensor([0, 2]), prefix, max_seq_len=8, alpha=1.0)
    >>> bool(torch.allclose(new, full[3:], atol=1e-6))
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models import jagged
from models.ops.hstu_attention import AttentionImpl, resolve_impl
from models.ops.hstu_attention_reference import allowed_mask
from models.ops.per_batch import cached
from models.ops.relative_bias import RelativeBias


@dataclass(frozen=True)
class CachedPrefix:
    """One layer's cached keys and values of B sequences' prefixes.

    Attributes:
        keys: [P, H, Dqk]; values: [P, H, Dv]; timestamps: [P] int64 (read only with a bias).
        starts, lengths: int64 [B]: sequence b's prefix is rows ``starts[b] : starts[b] + lengths[b]``
            (ranges may overlap: sequences can share a prefix).
        max_length: a bound on ``lengths`` known on the host, or None to read it from ``lengths`` (a
            device-to-host copy, which a CUDA graph cannot hold).
    """

    keys: torch.Tensor
    values: torch.Tensor
    timestamps: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    max_length: int | None = None

    def bound(self) -> int:
        return self.max_length if self.max_length is not None else _max(self.lengths)


def _max(lengths: torch.Tensor) -> int:
    return int(lengths.max()) if lengths.numel() else 0


def hstu_attention_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    prefix: CachedPrefix,
    max_seq_len: int,
    alpha: float,
    *,
    rab: RelativeBias | None = None,
    max_new: int | None = None,
    impl: str | AttentionImpl = AttentionImpl.AUTO,
) -> torch.Tensor:
    """New tokens' HSTU attention over their cached prefix and themselves (causal).

    Args:
        q, k: [L, H, Dqk]; v: [L, H, Dv]: the new tokens of all sequences, back to back.
        seq_offsets: int64 [B+1]: sequence b's new tokens are rows seq_offsets[b]:seq_offsets[b+1].
        prefix: the cached keys/values of each sequence's prefix (``CachedPrefix``).
        max_seq_len: the longest sequence allowed (cached + new); also the attention's normaliser.
        alpha: scale of Q K^T.
        rab: relative bias; its ``timestamps`` are the new tokens' [L], the prefix's are in ``prefix``.
        max_new: a host bound on the new tokens per sequence (None: read from ``seq_offsets``). With it
            and ``prefix.max_length`` the call makes no device-to-host copy (CUDA graphs).
        impl: "triton", "pytorch" (the batched version) or "auto" (Triton on CUDA).

    Returns:
        [L, H, Dv].
    """
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"expected q, k [L, H, D] and v [L, H, Dv]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if prefix.keys.shape[1:] != q.shape[1:] or prefix.values.shape[1:] != v.shape[1:]:
        raise ValueError(f"the prefix's keys {tuple(prefix.keys.shape)} / values {tuple(prefix.values.shape)} do "
                         f"not match q {tuple(q.shape)} / v {tuple(v.shape)}")
    if resolve_impl(impl, q.device) is AttentionImpl.TRITON:
        from models.ops.hstu_attention_cached_triton import hstu_attention_cached_triton

        return hstu_attention_cached_triton(q, k, v, seq_offsets, prefix, max_seq_len, alpha, rab=rab,
                                            max_new=max_new)
    return hstu_attention_cached_dense(q, k, v, seq_offsets, prefix, max_seq_len, alpha, rab=rab, max_new=max_new)


def hstu_attention_cached_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    prefix: CachedPrefix,
    max_seq_len: int,
    alpha: float,
    rab: RelativeBias | None = None,
) -> torch.Tensor:
    """The specification, one sequence at a time, in fp32: the last rows of the full op's mask and bias
    over the whole sequence (prefix, then the new tokens)."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    offsets, starts, lengths = seq_offsets.tolist(), prefix.starts.tolist(), prefix.lengths.tolist()
    for b in range(len(offsets) - 1):
        lo, hi, s, n = offsets[b], offsets[b + 1], starts[b], lengths[b]
        total = n + hi - lo
        if total > max_seq_len:
            raise ValueError(f"{n} cached + {hi - lo} new tokens exceed max_seq_len={max_seq_len}")
        if hi == lo:
            continue
        keys = torch.cat([prefix.keys[s : s + n], k[lo:hi]]).float().transpose(0, 1)  # [H, n + m, d]
        values = torch.cat([prefix.values[s : s + n], v[lo:hi]]).float().transpose(0, 1)
        scores = alpha * q[lo:hi].float().transpose(0, 1) @ keys.transpose(1, 2)  # [H, m, n + m]
        if rab is not None:
            stamps = torch.cat([prefix.timestamps[s : s + n], rab.timestamps[lo:hi]])
            whole = RelativeBias(rab.pos_weights, rab.time_weights, stamps, rab.time_bucket_scale)
            scores = scores + whole.dense(0, total, max_seq_len)[n:].float()
        weights = F.silu(scores) * allowed_mask(total, 0, q.device)[n:] / max_seq_len
        out[lo:hi] = (weights @ values).transpose(0, 1).to(q.dtype)
    return out


def hstu_attention_cached_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    prefix: CachedPrefix,
    max_seq_len: int,
    alpha: float,
    rab: RelativeBias | None = None,
    max_new: int | None = None,
) -> torch.Tensor:
    """``hstu_attention_cached`` in a handful of batched ops over [B, H, M, M] and [B, H, M, P] scores (M
    new and P cached tokens at most per sequence): small when the new tokens are few, as in serving. In fp32;
    no device-to-host copy when ``max_new`` and ``prefix.max_length`` are given. What depends only on
    the batch's layout (indices, mask, bias buckets) is derived once for all the model's blocks."""
    total, batch = q.shape[0], seq_offsets.numel() - 1
    m = max_new if max_new is not None else _max(seq_offsets.diff())
    if max_new is None and prefix.max_length is None and batch and \
            int((prefix.lengths + seq_offsets.diff()).max()) > max_seq_len:
        raise ValueError(f"a sequence of cached + new tokens exceeds max_seq_len={max_seq_len}")
    if total == 0 or m == 0:
        return torch.zeros(total, q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    p = prefix.bound()
    key = (total, m, p, max_seq_len, None if rab is None else (rab.time_bucket_scale, rab.num_time_buckets))
    tensors = (seq_offsets, prefix.starts, prefix.lengths, prefix.timestamps,
               *(() if rab is None else (rab.timestamps,)))
    lay = cached("cached-layout", tensors, key, lambda: _Layout(seq_offsets, prefix, total, m, p, max_seq_len, rab))
    # Two parts, never concatenated: the new tokens against the cached keys [B, H, M, P] (all visible),
    # and against the new keys [B, H, M, M] (causal).
    queries = lay.pad(_fp32(q)).transpose(1, 2)  # [B, H, M, d]
    new_k, new_v = (lay.pad(_fp32(t)).transpose(1, 2) for t in (k, v))
    if alpha != 1.0:
        queries = alpha * queries
    if lay.one_each:  # one new token per sequence (decode, candidates): it sees itself, gap 0, position 0
        scores = (queries * new_k).sum(-1, keepdim=True)  # [B, H, 1, 1]
        if rab is not None:
            scores = scores + (rab.pos_weights[max_seq_len - 1] + rab.time_weights[0]).float()
        av = F.silu(scores) * new_v
    else:
        scores = queries @ new_k.transpose(-1, -2)
        if rab is not None:
            scores = scores + lay.new_bias(rab)[:, None]
        av = (F.silu(scores) * lay.new_allowed) @ new_v
    if p:
        cached_k, cached_v = (_fp32(lay.gather(t)).transpose(1, 2) for t in (prefix.keys, prefix.values))
        scores = queries @ cached_k.transpose(-1, -2)
        if rab is not None:
            scores = scores + lay.cached_bias(rab)[:, None]
        weights = F.silu(scores)
        av = av + (weights if lay.whole_prefix else weights * lay.cached_allowed) @ cached_v
    out = lay.unpad((av / max_seq_len).transpose(1, 2))  # [L, H, dv]
    return out if out.dtype == q.dtype else out.to(q.dtype)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


class _Layout:
    """Where each sequence's new tokens and cached keys sit in the padded [B, M] and [B, P + M] views."""

    def __init__(self, seq_offsets: torch.Tensor, prefix: CachedPrefix, total: int, m: int, p: int,
                 max_seq_len: int, rab: RelativeBias | None) -> None:
        device, batch = seq_offsets.device, seq_offsets.numel() - 1
        self.total, self.m, self.batch = total, m, batch
        # B sequences of exactly M new tokens each (one state extended, a decode step, candidates): the
        # padded view is a reshape. Known on the host: L = B x M and no sequence has more than M.
        self.uniform = total == batch * m
        self.one_each = self.uniform and m == 1
        if not self.uniform:
            self.rows = (jagged.sequence_index(seq_offsets, total), jagged.positions(seq_offsets, total))
        new_lengths = seq_offsets.diff()[:, None, None]
        i = torch.arange(m, device=device)[None, :, None]  # new token i of its sequence
        j = torch.arange(m, device=device)[None, None, :]  # new key j
        rows_ok = i < new_lengths
        if not self.one_each:
            self.new_allowed = ((j <= i) & rows_ok)[:, None]  # [B, 1, M, M]; j <= i < length: j inside too
        steps = torch.arange(p, device=device)
        # One sequence on a CPU (a user's new events): reading its start and length costs nothing there,
        # and with them its prefix is a slice, every key visible.
        self.contiguous = None
        if batch == 1 and self.uniform and device.type == "cpu":
            start, length = int(prefix.starts[0]), int(prefix.lengths[0])
            if length == p:
                self.contiguous = slice(start, start + p)
        self.whole_prefix = self.contiguous is not None
        if not self.whole_prefix:
            cached_ok = steps < prefix.lengths[:, None]  # [B, P]
            self.cached_rows = torch.where(cached_ok, prefix.starts[:, None] + steps, 0)  # past a prefix: masked
            self.cached_allowed = (cached_ok[:, None, :] & rows_ok)[:, None]  # [B, 1, M, P]
        if rab is not None:
            n = prefix.lengths[:, None, None]
            # Relative positions key - query + max_seq_len - 1: new keys (n + j) - (n + i), cached j - (n + i).
            if not self.one_each:
                self.new_relative = (j - i + max_seq_len - 1).clamp(0, 2 * max_seq_len - 2).expand(batch, m, m)
            self.cached_relative = (steps[None, None, :] - (n + i) + max_seq_len - 1).clamp(0, 2 * max_seq_len - 2)
            query_time = self.pad(rab.timestamps)[:, :, None]  # [B, M, 1]
            if not self.one_each:
                self.new_buckets = rab.buckets(query_time, query_time.transpose(1, 2))
            self.cached_buckets = rab.buckets(query_time, self.gather(prefix.timestamps)[:, None, :])

    def new_bias(self, rab: RelativeBias) -> torch.Tensor:
        """[B, M, M] the bias of the new tokens against each other."""
        return _fp32(rab.pos_weights.take(self.new_relative) + rab.time_weights.take(self.new_buckets))

    def cached_bias(self, rab: RelativeBias) -> torch.Tensor:
        """[B, M, P] the bias of the new tokens against the cached keys."""
        return _fp32(rab.pos_weights.take(self.cached_relative) + rab.time_weights.take(self.cached_buckets))

    def gather(self, cache: torch.Tensor) -> torch.Tensor:
        """[P_all, ...] cached rows -> [B, P, ...] each sequence's prefix (index_select: on a CPU several
        times faster than advanced indexing)."""
        if self.contiguous is not None:
            view = cache[self.contiguous][None]
            # A view of a cache made under inference_mode cannot enter a graph autograd records.
            return view.clone() if torch.is_grad_enabled() else view
        rows = self.cached_rows
        return cache.index_select(0, rows.flatten()).view(*rows.shape, *cache.shape[1:])

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """[L, ...] -> [B, M, ...]."""
        if self.uniform:
            return t.reshape(-1, self.m, *t.shape[1:])
        out = t.new_zeros(self.batch, self.m, *t.shape[1:])
        return out.index_put(self.rows, t)

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """[B, M, ...] -> [L, ...]."""
        return t.reshape(self.total, *t.shape[2:]) if self.uniform else t[self.rows]
