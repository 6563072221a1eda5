"""HSTU over a cached prefix: each block's keys and values of the tokens already seen, so new tokens
cost O(new x seen) instead of a recompute of the whole sequence.

HSTU is causal and its position embedding counts from the oldest token, so the keys and values of a
prefix never change when tokens are appended. ``extend`` runs only the new tokens through every
block, attending to the cached keys/values plus their own (causal among themselves), and returns the
new outputs and a new ``PrefixState`` (the old one is left as it was, so a hypothetical continuation,
as in generation, never touches a user's cached state). It computes exactly what ``HSTU.forward``
computes for those rows, up to floating-point order.

The attention here is plain PyTorch over [new, seen + new] scores: the new tokens are few, so this is
memory-bound and small; a full history still goes through the jagged op (and its Triton kernel) as
the prefill of an empty state.

Example::

    >>> from models.config import ModelConfig
    >>> hstu = HSTU(ModelConfig(embedding_dim=8, attention_dim=4, linear_dim=4, max_seq_len=16)).eval()
    >>> table = torch.randn(10, 8)
    >>> out, state = extend(hstu, table, torch.tensor([3, 5, 7]), torch.tensor([0, 60, 120]), None)
    >>> out2, state = extend(hstu, table, torch.tensor([2]), torch.tensor([180]), state)
    >>> full = hstu(table[[3, 5, 7, 2]], torch.tensor([0, 60, 120, 180]), torch.tensor([0, 4]))
    >>> bool(torch.allclose(out2[-1], full[-1], atol=1e-5)), state.length
    (True, 4)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.embeddings import l2_normalize
from models.hstu import HSTU, HSTUBlock
from models.ops.relative_bias import time_gap_bucket


@dataclass(frozen=True)
class PrefixState:
    """The cached part of one sequence (all tensors on the model's device).

    Attributes:
        items: [n] dense item ids, oldest first.
        timestamps: [n] int64 seconds.
        keys: per block, [n, H, dqk].
        values: per block, [n, H, dv].
        user: [d] L2-normalised output at the last token (the user embedding), or None when n == 0.
    """

    items: torch.Tensor
    timestamps: torch.Tensor
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    user: torch.Tensor | None

    @property
    def length(self) -> int:
        return int(self.items.numel())

    @property
    def nbytes(self) -> int:
        tensors = [self.items, self.timestamps, *self.keys, *self.values]
        if self.user is not None:
            tensors.append(self.user)
        return sum(t.numel() * t.element_size() for t in tensors)

    @staticmethod
    def empty(encoder: HSTU, device: torch.device | str = "cpu") -> PrefixState:
        keys = tuple(torch.zeros(0, b.num_heads, b.attention_dim, device=device) for b in encoder.blocks)
        values = tuple(torch.zeros(0, b.num_heads, b.linear_dim, device=device) for b in encoder.blocks)
        long = torch.zeros(0, dtype=torch.int64, device=device)
        return PrefixState(long, long, keys, values, None)


def extend(
    encoder: HSTU,
    item_table: torch.Tensor,
    items: torch.Tensor,
    timestamps: torch.Tensor,
    state: PrefixState | None,
) -> tuple[torch.Tensor, PrefixState]:
    """Appends ``items`` (dense ids [m], timestamps [m]) to ``state`` (None: an empty prefix).

    Returns ([m, d] L2-normalised outputs of the new tokens, the extended state). Raises ValueError
    when the sequence would exceed the model's ``max_seq_len``: positions count from the oldest token,
    so a sliding window cannot reuse a prefix and the caller recomputes the window instead.
    """
    if encoder.training:
        raise RuntimeError("extend() is for inference: call encoder.eval() first (dropout would differ)")
    if state is None:
        state = PrefixState.empty(encoder, item_table.device)
    start, m = state.length, int(items.numel())
    max_len = encoder.input.position_embeddings.shape[0]
    if start + m > max_len:
        raise ValueError(f"{start} cached + {m} new tokens exceed max_seq_len={max_len}")
    if m == 0:
        raise ValueError("extend() needs at least one new token")
    all_timestamps = torch.cat([state.timestamps, timestamps.to(state.timestamps.device)])
    positions = torch.arange(start, start + m, device=item_table.device)
    x = item_table[items] * encoder.input.scale + encoder.input.position_embeddings[positions]
    keys, values = [], []
    for block, k_cache, v_cache in zip(encoder.blocks, state.keys, state.values, strict=True):
        x, k_all, v_all = _block_extend(block, x, all_timestamps, start, k_cache, v_cache)
        keys.append(k_all)
        values.append(v_all)
    out = l2_normalize(x, encoder.eps)
    # clone: a view would keep the whole [m, d] output alive behind a [d] row (and the cache's byte count)
    new_state = PrefixState(torch.cat([state.items, items]), all_timestamps, tuple(keys), tuple(values),
                            out[-1].clone())
    return out, new_state


def _block_extend(
    block: HSTUBlock, x: torch.Tensor, timestamps: torch.Tensor, start: int, k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block for the new rows x [m, d] at positions start..start+m-1, against the cache."""
    m, h, dqk, dv = x.shape[0], block.num_heads, block.attention_dim, block.linear_dim
    u, v, q, k = block.project(x)
    k_all = torch.cat([k_cache, k.reshape(m, h, dqk)])
    v_all = torch.cat([v_cache, v.reshape(m, h, dv)])
    n = k_all.shape[0]
    i = torch.arange(start, start + m, device=x.device)[:, None]
    j = torch.arange(n, device=x.device)[None, :]
    bias = block.pos_weights[j - i + block.max_seq_len - 1] + block.time_weights[
        time_gap_bucket(timestamps[i] - timestamps[j], block.time_bucket_scale, block.time_weights.numel() - 1)
    ]
    scores = torch.einsum("mhd,nhd->hmn", q.reshape(m, h, dqk), k_all) + bias  # alpha = 1, as the block
    weights = F.silu(scores) * (j <= i) / block.max_seq_len
    av = torch.einsum("hmn,nhd->mhd", weights, v_all).reshape(m, h * dv)
    return block.output(x, u, av), k_all, v_all


@dataclass(frozen=True)
class PaddedCaches:
    """B prefix states padded to one length: the fixed-shape input of ``decode_padded``.

    Attributes:
        keys, values: per block [B, n, H, dqk] / [B, n, H, dv]; rows past a state's length are ignored.
        timestamps: [B, n] int64.
        lengths: [B] int64 cached tokens per row; 0 marks a padding row (its outputs are ignored).
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    timestamps: torch.Tensor
    lengths: torch.Tensor

    @staticmethod
    def allocate(encoder: HSTU, batch: int, length: int, device: torch.device | str,
                 dtype: torch.dtype | None = None) -> PaddedCaches:
        dtype = dtype or encoder.input.position_embeddings.dtype
        keys = tuple(torch.zeros(batch, length, b.num_heads, b.attention_dim, device=device, dtype=dtype)
                     for b in encoder.blocks)
        values = tuple(torch.zeros(batch, length, b.num_heads, b.linear_dim, device=device, dtype=dtype)
                       for b in encoder.blocks)
        long = torch.zeros(batch, length, dtype=torch.int64, device=device)
        return PaddedCaches(keys, values, long, torch.zeros(batch, dtype=torch.int64, device=device))

    def fill(self, states: list[PrefixState]) -> None:
        """Copies ``states`` into rows 0..len(states)-1 (in place, so CUDA-graph buffers stay put); the
        other rows become padding."""
        lengths = torch.zeros(self.lengths.shape[0], dtype=torch.int64)
        for b, s in enumerate(states):
            n = lengths[b] = s.length
            for dst, src in zip(self.keys + self.values, s.keys + s.values, strict=True):
                dst[b, :n] = src
            self.timestamps[b, :n] = s.timestamps
        self.lengths.copy_(lengths)  # one host-to-device copy


def decode_padded(
    encoder: HSTU, item_table: torch.Tensor, items: torch.Tensor, timestamps: torch.Tensor, caches: PaddedCaches
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One new token per row after its cached prefix, fixed shapes and no host synchronisation (so a
    CUDA graph can capture it). Each new token attends to its row's cache (masked past ``lengths``)
    and to itself, at position ``lengths``.

    Returns ([B, d] L2-normalised outputs, per block the new tokens' keys [B, H, dqk] and values [B, H, dv]).
    """
    lengths = caches.lengths
    n = caches.timestamps.shape[1]
    j = torch.arange(n, device=item_table.device)[None, :]
    valid = (j < lengths[:, None])[:, None, :]  # [B, 1, n]
    x = item_table[items] * encoder.input.scale + encoder.input.position_embeddings[lengths]
    # The relative-position and time-bucket indices are the same in every block (one config).
    first = encoder.blocks[0]
    rel = (j - lengths[:, None] + first.max_seq_len - 1).clamp(0, 2 * first.max_seq_len - 2)
    gap = time_gap_bucket(timestamps[:, None] - caches.timestamps, first.time_bucket_scale,
                          first.time_weights.numel() - 1)
    new_keys, new_values = [], []
    for layer, block in enumerate(encoder.blocks):
        h, dqk, dv = block.num_heads, block.attention_dim, block.linear_dim
        u, v, q, k = block.project(x)
        q, k, v = q.reshape(-1, h, dqk), k.reshape(-1, h, dqk), v.reshape(-1, h, dv)
        bias = block.pos_weights[rel] + block.time_weights[gap]  # [B, n]
        history = torch.einsum("bhd,bnhd->bhn", q, caches.keys[layer]) + bias[:, None, :]
        history_w = torch.where(valid, F.silu(history), 0.0) / block.max_seq_len
        self_w = F.silu((q * k).sum(-1) + block.pos_weights[block.max_seq_len - 1] + block.time_weights[0])
        av = torch.einsum("bhn,bnhd->bhd", history_w, caches.values[layer])
        av = av + (self_w / block.max_seq_len)[..., None] * v
        x = block.output(x, u, av.reshape(-1, h * dv))
        new_keys.append(k)
        new_values.append(v)
    return l2_normalize(x, encoder.eps), new_keys, new_values


def append_decoded(states: list[PrefixState], items: torch.Tensor, timestamps: torch.Tensor, out: torch.Tensor,
                   new_keys: list[torch.Tensor], new_values: list[torch.Tensor]) -> list[PrefixState]:
    """The states after ``decode_padded``: each one's cache plus its new token (rows 0..len(states)-1)."""
    return [
        PrefixState(torch.cat([s.items, items[b : b + 1]]), torch.cat([s.timestamps, timestamps[b : b + 1]]),
                    tuple(torch.cat([c, k[b : b + 1]]) for c, k in zip(s.keys, new_keys, strict=True)),
                    tuple(torch.cat([c, v[b : b + 1]]) for c, v in zip(s.values, new_values, strict=True)),
                    out[b].clone())
        for b, s in enumerate(states)
    ]


def extend_one_each(
    encoder: HSTU,
    item_table: torch.Tensor,
    items: torch.Tensor,
    timestamps: torch.Tensor,
    states: list[PrefixState],
) -> tuple[torch.Tensor, list[PrefixState]]:
    """``extend`` of B sequences by one token each, in one batched pass (a decode step).

    items, timestamps: [B], the new token of each state. Every state must be non-empty and shorter
    than ``max_seq_len``. Returns ([B, d] L2-normalised outputs of the new tokens, the B new states).
    The caches of different lengths are padded to the longest; the padding is masked out.
    """
    if encoder.training:
        raise RuntimeError("extend_one_each() is for inference: call encoder.eval() first")
    max_len = encoder.input.position_embeddings.shape[0]
    if any(s.length == 0 or s.length >= max_len for s in states):
        raise ValueError(f"every state needs 1 .. {max_len - 1} cached tokens to take one more")
    caches = PaddedCaches.allocate(encoder, len(states), max(s.length for s in states), item_table.device,
                                   states[0].keys[0].dtype)
    caches.fill(states)
    out, new_keys, new_values = decode_padded(encoder, item_table, items, timestamps, caches)
    return out, append_decoded(states, items, timestamps, out, new_keys, new_values)


def extend_candidates(
    encoder: HSTU,
    item_table: torch.Tensor,
    candidates: torch.Tensor,
    timestamps: torch.Tensor,
    state: PrefixState,
) -> tuple[torch.Tensor, list[PrefixState]]:
    """Each of K candidates appended to the same prefix, in one pass: candidate c attends to the cached
    history and to itself only (the ``num_targets`` mask) and sits at the next position, exactly as if
    it had been appended alone. Returns ([K, d] L2-normalised outputs, the K extended states).
    """
    if encoder.training:
        raise RuntimeError("extend_candidates() is for inference: call encoder.eval() first")
    n, k_count = state.length, int(candidates.numel())
    max_len = encoder.input.position_embeddings.shape[0]
    if n == 0 or n >= max_len:
        raise ValueError(f"the prefix needs 1 .. {max_len - 1} tokens to take candidates, has {n}")
    x = item_table[candidates] * encoder.input.scale + encoder.input.position_embeddings[n]
    j = torch.arange(n, device=x.device)
    keys: list[list[torch.Tensor]] = [[] for _ in range(k_count)]
    values: list[list[torch.Tensor]] = [[] for _ in range(k_count)]
    for layer, block in enumerate(encoder.blocks):
        h, dqk, dv = block.num_heads, block.attention_dim, block.linear_dim
        u, v, q, k = block.project(x)
        q, k, v = q.reshape(-1, h, dqk), k.reshape(-1, h, dqk), v.reshape(-1, h, dv)
        k_cache, v_cache = state.keys[layer], state.values[layer]
        num_buckets = block.time_weights.numel() - 1
        history_bias = block.pos_weights[j - n + block.max_seq_len - 1][None, :] + block.time_weights[
            time_gap_bucket(timestamps[:, None] - state.timestamps[None, :], block.time_bucket_scale, num_buckets)
        ]  # [K, n]
        self_bias = block.pos_weights[block.max_seq_len - 1] + block.time_weights[0]  # gap 0, same position
        history_w = F.silu(torch.einsum("khd,nhd->khn", q, k_cache) + history_bias[:, None, :]) / block.max_seq_len
        self_w = F.silu((q * k).sum(-1) + self_bias) / block.max_seq_len  # [K, H]
        av = torch.einsum("khn,nhd->khd", history_w, v_cache) + self_w[..., None] * v
        x = block.output(x, u, av.reshape(-1, h * dv))
        for c in range(k_count):
            keys[c].append(torch.cat([k_cache, k[c : c + 1]]))
            values[c].append(torch.cat([v_cache, v[c : c + 1]]))
    out = l2_normalize(x, encoder.eps)
    states = [
        PrefixState(torch.cat([state.items, candidates[c : c + 1]]),
                    torch.cat([state.timestamps, timestamps[c : c + 1]]), tuple(keys[c]), tuple(values[c]),
                    out[c].clone())
        for c in range(k_count)
    ]
    return out, states
