"""Per-user prefix states for inference over a cache, and the calls of ``HSTU.forward`` that extend them.

A ``PrefixState`` is one user's cached sequence: items, timestamps, each block's keys and values, and the
user embedding at its last token. Every function here is one call of the encoder's own forward with a
``Prefix`` built from states (``models.hstu``): appending events (``extend``), one token for each of B
users (``extend_one_each``, a decode step), K candidates after one history (``extend_candidates``), and
the fixed-shape decode step a CUDA graph captures (``decode_padded`` over ``PaddedCaches``). The
attention over the cache, its bias and the input layer exist only in the encoder; these functions
only lay states out as a ``Prefix`` and read the new keys and values back. States are never changed in
place: a hypothetical continuation (generation, beams) leaves the user's cached state as it was.

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
from torch.nn.utils.rnn import pad_sequence

from models.hstu import HSTU, Prefix


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

    def then(self, items: torch.Tensor, timestamps: torch.Tensor, keys: list[torch.Tensor],
             values: list[torch.Tensor], user: torch.Tensor) -> PrefixState:
        """This state followed by new tokens (their per-block keys and values, the last one's output)."""
        # clone: a view would keep the whole output batch alive behind a [d] row (and the cache's byte count)
        return PrefixState(torch.cat([self.items, items]), torch.cat([self.timestamps, timestamps]),
                           tuple(torch.cat([c, k]) for c, k in zip(self.keys, keys, strict=True)),
                           tuple(torch.cat([c, v]) for c, v in zip(self.values, values, strict=True)), user.clone())


def _prefix(encoder: HSTU, states: list[PrefixState], device: torch.device) -> Prefix:
    """B states' caches back to back (one state's as they are)."""
    lengths = [s.length for s in states]
    if len(states) == 1:
        s = states[0]
        zero = torch.zeros(1, dtype=torch.int64, device=device)
        return Prefix(s.keys, s.values, s.timestamps, zero, zero + s.length, max_length=s.length)
    # Padded to the longest, state b at rows b x P: one op per tensor, and a view as [B, P, ...] later.
    longest = max(lengths)

    def padded(tensors: list[torch.Tensor]) -> torch.Tensor:
        return pad_sequence(tensors, batch_first=True).flatten(0, 1)

    keys = tuple(padded([s.keys[i] for s in states]) for i in range(len(encoder.blocks)))
    values = tuple(padded([s.values[i] for s in states]) for i in range(len(encoder.blocks)))
    starts = torch.arange(len(states), device=device) * longest
    return Prefix(keys, values, padded([s.timestamps for s in states]), starts, torch.tensor(lengths, device=device),
                  max_length=longest)


def _for_inference(encoder: HSTU, what: str) -> None:
    if encoder.training:
        raise RuntimeError(f"{what}() is for inference: call encoder.eval() first (dropout would differ)")


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
    _for_inference(encoder, "extend")
    device = item_table.device
    start, m = (0 if state is None else state.length), int(items.numel())
    if start + m > encoder.max_seq_len:
        raise ValueError(f"{start} cached + {m} new tokens exceed max_seq_len={encoder.max_seq_len}")
    if m == 0:
        raise ValueError("extend() needs at least one new token")
    if state is None or state.length == 0:
        prefix = Prefix.empty(encoder, 1, device)
        state = PrefixState(prefix.timestamps, prefix.timestamps, prefix.keys, prefix.values, None)
    else:
        prefix = _prefix(encoder, [state], device)
    prefix.max_new = m  # checked above: no need to read it back from the offsets
    items, timestamps = items.to(device), timestamps.to(device)
    # arange, not torch.tensor([0, m]): a copy from the host would wait for the device to be idle
    out = encoder(item_table[items], timestamps, torch.arange(0, 2 * m, m, device=device), prefix)
    return out, state.then(items, timestamps, prefix.new_keys, prefix.new_values, out[-1])


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
    """
    _for_inference(encoder, "extend_one_each")
    if any(s.length == 0 or s.length >= encoder.max_seq_len for s in states):
        raise ValueError(f"every state needs 1 .. {encoder.max_seq_len - 1} cached tokens to take one more")
    prefix = _prefix(encoder, states, item_table.device)
    prefix.max_new = 1
    out = encoder(item_table[items], timestamps, torch.arange(len(states) + 1, device=item_table.device), prefix)
    return out, append_decoded(states, items, timestamps, out, prefix.new_keys, prefix.new_values)


def extend_candidates(
    encoder: HSTU,
    item_table: torch.Tensor,
    candidates: torch.Tensor,
    timestamps: torch.Tensor,
    state: PrefixState,
) -> tuple[torch.Tensor, list[PrefixState]]:
    """Each of K candidates appended to the same prefix, in one pass: K sequences of one new token that
    share the prefix's cached rows, so candidate c sits at the next position and sees the history and
    itself, exactly as if it had been appended alone. Returns ([K, d] outputs, the K extended states).
    """
    _for_inference(encoder, "extend_candidates")
    n, count, device = state.length, int(candidates.numel()), item_table.device
    if n == 0 or n >= encoder.max_seq_len:
        raise ValueError(f"the prefix needs 1 .. {encoder.max_seq_len - 1} tokens to take candidates, has {n}")
    shared = torch.zeros(count, dtype=torch.int64, device=device)
    prefix = Prefix(state.keys, state.values, state.timestamps, shared, shared + n, max_length=n, max_new=1)
    out = encoder(item_table[candidates], timestamps, torch.arange(count + 1, device=device), prefix)
    return out, append_decoded([state] * count, candidates, timestamps, out, prefix.new_keys, prefix.new_values)


def append_decoded(states: list[PrefixState], items: torch.Tensor, timestamps: torch.Tensor, out: torch.Tensor,
                   new_keys: list[torch.Tensor], new_values: list[torch.Tensor]) -> list[PrefixState]:
    """The states after one new token each (row b of ``items``, ``out`` and each block's keys/values)."""
    return [s.then(items[b : b + 1], timestamps[b : b + 1], [k[b : b + 1] for k in new_keys],
                   [v[b : b + 1] for v in new_values], out[b])
            for b, s in enumerate(states)]


@dataclass(frozen=True)
class PaddedCaches:
    """B prefix states in fixed buffers of one length N: the input of ``decode_padded``, whose shapes
    (and so a CUDA graph of it) do not depend on the states.

    Attributes:
        keys, values: per block [B, N, H, dqk] / [B, N, H, dv]; rows past a state's length are ignored.
        timestamps: [B, N] int64.
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

    def prefix(self) -> Prefix:
        """The buffers as the encoder's ``Prefix``: row b's cache starts at b x N; bounds known on the host."""
        batch, n = self.timestamps.shape
        starts = torch.arange(batch, device=self.lengths.device) * n
        return Prefix(tuple(k.flatten(0, 1) for k in self.keys), tuple(v.flatten(0, 1) for v in self.values),
                      self.timestamps.flatten(), starts, self.lengths, max_length=n, max_new=1)


def decode_padded(
    encoder: HSTU, item_table: torch.Tensor, items: torch.Tensor, timestamps: torch.Tensor, caches: PaddedCaches
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One new token per row after its cached prefix, with fixed shapes and no device-to-host copy (so a
    CUDA graph can capture it): ``HSTU.forward`` over ``caches.prefix()``.

    Returns ([B, d] L2-normalised outputs, per block the new tokens' keys [B, H, dqk] and values [B, H, dv]).
    """
    prefix = caches.prefix()
    offsets = torch.arange(items.numel() + 1, device=item_table.device)
    out = encoder(item_table[items], timestamps, offsets, prefix)
    return out, prefix.new_keys, prefix.new_values
