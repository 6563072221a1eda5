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
    if q.device.type == "cpu" and batch == 1:
        one = cached("cached-one-sequence", tensors, key, lambda: _OneSequence(prefix, m, max_seq_len, rab))
        if one.whole:
            return one.attend(q, k, v, prefix, max_seq_len, alpha, rab)
    if q.device.type == "cpu" and total == batch and m == 1:
        shared = cached("cached-shared", tensors, key, lambda: _SharedPrefix(prefix, max_seq_len, rab))
        if shared.shared:
            return shared.attend(q, k, v, prefix, max_seq_len, alpha, rab)
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
        av = av + (F.silu(scores) * lay.cached_allowed) @ cached_v
    out = lay.unpad((av / max_seq_len).transpose(1, 2))  # [L, H, dv]
    return out if out.dtype == q.dtype else out.to(q.dtype)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _cache_view(t: torch.Tensor) -> torch.Tensor:
    """A view of the cache, copied when autograd records: a cache made under ``inference_mode`` cannot
    be saved for a backward (a forward with gradients over a served state: tests)."""
    return t.clone() if torch.is_grad_enabled() and t.is_inference() else t


class _OneSequence:
    """One sequence on a CPU (a user's new events): its start and length cost nothing to read there, and
    with them the prefix is a slice: keys and values are concatenated and attended in one product, the
    fewest ops for the small steps a CPU server takes most."""

    def __init__(self, prefix: CachedPrefix, m: int, max_seq_len: int, rab: RelativeBias | None) -> None:
        start, n = int(prefix.starts[0]), int(prefix.lengths[0])
        self.whole = n == prefix.bound()  # the bound is the length: nothing past the prefix to mask
        self.rows = slice(start, start + n)
        i = torch.arange(m)[:, None] + n  # the new tokens' positions
        j = torch.arange(n + m)[None, :]  # the keys': the prefix's, then the new tokens'
        self.mask = None if m == 1 else j <= i  # one new token sees every key
        if rab is not None:
            self.relative = j - i + max_seq_len - 1  # in [0, 2 max_seq_len - 2] when n + m <= max_seq_len
            times = torch.cat([prefix.timestamps[self.rows], rab.timestamps])
            self.buckets = rab.buckets(rab.timestamps[:, None], times[None, :])

    def attend(self, q, k, v, prefix: CachedPrefix, max_seq_len: int, alpha: float, rab: RelativeBias | None):
        keys = torch.cat([prefix.keys[self.rows], k]).transpose(0, 1)  # [H, n + m, d]
        values = torch.cat([prefix.values[self.rows], v]).transpose(0, 1)
        scores = _fp32(q).transpose(0, 1) @ _fp32(keys).transpose(1, 2)  # [H, m, n + m]
        if alpha != 1.0:
            scores = alpha * scores
        if rab is not None:
            scores = scores + _fp32(rab.pos_weights.take(self.relative) + rab.time_weights.take(self.buckets))
        weights = F.silu(scores) if self.mask is None else F.silu(scores) * self.mask
        out = ((weights @ _fp32(values)) / max_seq_len).transpose(0, 1)  # [m, H, dv]
        return out if out.dtype == q.dtype else out.to(q.dtype)


class _SharedPrefix:
    """B sequences of one new token each after the same prefix (candidates after one history) on a CPU:
    the prefix is attended once as a slice, not gathered B times."""

    def __init__(self, prefix: CachedPrefix, max_seq_len: int, rab: RelativeBias | None) -> None:
        starts, lengths = prefix.starts.tolist(), prefix.lengths.tolist()
        n = lengths[0] if lengths else 0
        self.shared = bool(starts) and len(set(starts)) == 1 and set(lengths) == {n} and n == prefix.bound()
        if not self.shared:
            return
        self.rows = slice(starts[0], starts[0] + n)
        if rab is not None:  # every new token sits at position n; key j at j
            self.relative = torch.arange(n) - n + max_seq_len - 1  # [n]
            self.buckets = rab.buckets(rab.timestamps[:, None], prefix.timestamps[self.rows][None, :])  # [B, n]

    def attend(self, q, k, v, prefix: CachedPrefix, max_seq_len: int, alpha: float, rab: RelativeBias | None):
        q, k, v = _fp32(q), _fp32(k), _fp32(v)
        if alpha != 1.0:
            q = alpha * q
        history = torch.einsum("bhd,nhd->bhn", q, _fp32(_cache_view(prefix.keys[self.rows])))  # [B, H, n]
        itself = (q * k).sum(-1)  # [B, H]: the token against its own key, gap 0, relative position 0
        if rab is not None:
            bias = rab.pos_weights.take(self.relative)[None, :] + rab.time_weights.take(self.buckets)
            history = history + _fp32(bias)[:, None, :]
            itself = itself + _fp32(rab.pos_weights[max_seq_len - 1] + rab.time_weights[0])
        out = torch.einsum("bhn,nhd->bhd", F.silu(history), _fp32(_cache_view(prefix.values[self.rows])))
        out = (out + F.silu(itself)[..., None] * v) / max_seq_len  # [B, H, dv]
        return out if out.dtype == q.dtype else out.to(q.dtype)


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
        # Prefixes padded to P, sequence b's at rows b x P (``models.incremental`` lays several states out
        # so): on a CPU, where reading the starts costs nothing, a view instead of a gather.
        self.padded = device.type == "cpu" and prefix.keys.shape[0] == batch * p and \
            prefix.starts.tolist() == list(range(0, batch * p, p or 1))[:batch]
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
        rows = self.cached_rows
        if self.padded:
            return _cache_view(cache.view(*rows.shape, *cache.shape[1:]))
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
