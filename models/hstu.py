"""HSTU, the encoder of "Actions Speak Louder than Words" (Zhai et al., 2024), on jagged inputs.

One block, for x [L, d] (all sequences of the batch back to back):

    U, V, Q, K = split(SiLU(LN(x) @ W_uvqk))                       # no bias; per head dv, dv, dqk, dqk
    A V        = causal, per sequence: SiLU(Q K^T + rab_pos + rab_time) / max_seq_len @ V
    out        = x + W_o(Dropout(U * LN(A V))) + b_o

as generative-recommenders' research model (which produced the paper's ML-1M numbers): LayerNorms
without affine parameters (eps 1e-6), the second LayerNorm over all heads together, no 1/sqrt(d) on
Q K^T, and one relative bias (positions and log time gaps) per block. The encoder is
``InputLayer -> blocks -> L2 normalisation``.

The same forward serves inference over a cache (as gpt-fast's attention takes its KV cache): given a
``Prefix`` (each block's keys and values of tokens already seen), only the new tokens run, at the
positions after their prefix, attending to it through ``hstu_attention_cached``; the forward records
their keys and values in the ``Prefix`` for the caller to keep. HSTU is causal and counts positions from
the oldest token, so a prefix's keys and values never change when tokens are appended.

Example::

    >>> from models.config import ModelConfig
    >>> hstu = HSTU(ModelConfig(embedding_dim=8, attention_dim=4, linear_dim=4, max_seq_len=16))
    >>> offsets = torch.tensor([0, 3, 5])
    >>> users = hstu(torch.randn(5, 8), torch.arange(5) * 60, offsets)  # [L, d], one per position
    >>> users.shape
    torch.Size([5, 8])
    >>> hstu = hstu.eval()   # inference: the first sequence's last 2 tokens after its cached 1
    >>> full = hstu(x := torch.randn(3, 8), t := torch.arange(3) * 60, torch.tensor([0, 3]))
    >>> prefix = Prefix.empty(hstu, batch=1)
    >>> first = hstu(x[:1], t[:1], torch.tensor([0, 1]), prefix)      # records its keys and values
    >>> cached = Prefix(tuple(prefix.new_keys), tuple(prefix.new_values), t[:1], torch.tensor([0]), torch.tensor([1]))
    >>> rest = hstu(x[1:], t[1:], torch.tensor([0, 2]), cached)
    >>> bool(torch.allclose(rest, full[1:], atol=1e-5))
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.config import ModelConfig
from models.embeddings import InputLayer, l2_normalize
from models.ops import RelativeBias, hstu_attention, per_batch
from models.ops.hstu_attention_cached import CachedPrefix, hstu_attention_cached

LAYER_NORM_EPS = 1e-6
"""GR's HSTU LayerNorm epsilon."""


@dataclass
class Prefix:
    """What ``HSTU.forward`` attends to besides the new tokens: B sequences' cached prefixes, per block.

    Sequence b's prefix is rows ``starts[b] : starts[b] + lengths[b]`` of each block's ``keys`` and
    ``values`` (several sequences may share rows: candidates scored after one history). The forward
    appends each block's keys and values of the new tokens to ``new_keys`` / ``new_values``.

    Attributes:
        keys, values: per block [P, H, dqk] / [P, H, dv].
        timestamps: [P] int64 seconds; starts, lengths: int64 [B].
        max_length, max_new: host bounds on ``lengths`` and on the new tokens per sequence, or None to
            read them from the tensors (with both, a forward makes no device-to-host copy: CUDA graphs).
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    timestamps: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    max_length: int | None = None
    max_new: int | None = None
    new_keys: list[torch.Tensor] = field(default_factory=list)
    new_values: list[torch.Tensor] = field(default_factory=list)

    @staticmethod
    def empty(encoder: HSTU, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
              ) -> Prefix:
        """B sequences with nothing cached (a prefill)."""
        dtype = dtype or encoder.input.position_embeddings.dtype
        keys = tuple(torch.zeros(0, b.num_heads, b.attention_dim, device=device, dtype=dtype) for b in encoder.blocks)
        values = tuple(torch.zeros(0, b.num_heads, b.linear_dim, device=device, dtype=dtype) for b in encoder.blocks)
        zeros = torch.zeros(batch, dtype=torch.int64, device=device)
        return Prefix(keys, values, zeros[:0], zeros, zeros, max_length=0)

    def layer(self, index: int) -> CachedPrefix:
        return CachedPrefix(self.keys[index], self.values[index], self.timestamps, self.starts, self.lengths,
                            self.max_length)

    def record(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.new_keys.append(keys)
        self.new_values.append(values)


class HSTUBlock(nn.Module):
    """One HSTU layer with its own relative attention bias.

    Parameters are held directly (not in nn.Linear) so that ``reset_parameters`` alone gives GR's init;
    TorchRec's DistributedModelParallel calls it when it materialises a model built on the meta device.
    """

    def __init__(self, config: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__()
        d, h = config.embedding_dim, config.num_heads
        self.num_heads, self.attention_dim, self.linear_dim = h, config.attention_dim, config.linear_dim
        self.max_seq_len = config.max_seq_len
        self.dropout = config.dropout
        self.time_bucket_scale = config.time_bucket_scale
        self.attention_impl = config.attention_impl
        width = h * (2 * config.linear_dim + 2 * config.attention_dim)
        self.uvqk = nn.Parameter(torch.empty(d, width, device=device))
        self.out_weight = nn.Parameter(torch.empty(d, h * config.linear_dim, device=device))
        self.out_bias = nn.Parameter(torch.empty(d, device=device))
        self.pos_weights = nn.Parameter(torch.empty(2 * config.max_seq_len - 1, device=device))
        self.time_weights = nn.Parameter(torch.empty(config.num_time_buckets + 1, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GR: uvqk and both bias tables ~ N(0, 0.02); W_o xavier-uniform; b_o keeps nn.Linear's default.
        nn.init.normal_(self.uvqk, std=0.02)
        nn.init.xavier_uniform_(self.out_weight)
        bound = 1 / math.sqrt(self.out_weight.shape[1])
        nn.init.uniform_(self.out_bias, -bound, bound)
        nn.init.normal_(self.pos_weights, std=0.02)
        nn.init.normal_(self.time_weights, std=0.02)

    def forward(self, x: torch.Tensor, timestamps: torch.Tensor, seq_offsets: torch.Tensor,
                prefix: Prefix | None = None) -> torch.Tensor:
        """x [L, d], timestamps [L] int64, seq_offsets [B+1] -> [L, d]. With a ``prefix``, x holds only
        the new tokens: they attend to this block's cached keys and values too, and their own are
        recorded in the prefix (blocks run in order, so this block's layer is the next unrecorded one)."""
        n, h = x.shape[0], self.num_heads
        u, v, q, k = self.project(x)
        q, k, v = q.reshape(n, h, self.attention_dim), k.reshape(n, h, self.attention_dim), v.reshape(n, h, -1)
        rab = RelativeBias(self.pos_weights, self.time_weights, timestamps, self.time_bucket_scale)
        if prefix is None:
            av = hstu_attention(q, k, v, seq_offsets, self.max_seq_len, alpha=1.0,  # GR does not scale Q K^T
                                rab=rab, impl=self.attention_impl)
        else:
            av = hstu_attention_cached(q, k, v, seq_offsets, prefix.layer(len(prefix.new_keys)), self.max_seq_len,
                                       alpha=1.0, rab=rab, max_new=prefix.max_new, impl=self.attention_impl)
            prefix.record(k, v)
        return self.output(x, u, av.reshape(n, h * self.linear_dim))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """U, V, Q, K = split(SiLU(LN(x) W_uvqk)), each [rows, heads * per-head width]."""
        h, dqk, dv = self.num_heads, self.attention_dim, self.linear_dim
        uvqk = F.silu(F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS) @ self.uvqk)
        u, v, q, k = uvqk.split([h * dv, h * dv, h * dqk, h * dqk], dim=-1)
        return u, v, q, k

    def output(self, x: torch.Tensor, u: torch.Tensor, av: torch.Tensor) -> torch.Tensor:
        """x + W_o(Dropout(U * LN(A V))) + b_o, with av [rows, heads * dv]."""
        gated = u * F.layer_norm(av, av.shape[-1:], eps=LAYER_NORM_EPS)
        return x + F.linear(F.dropout(gated, self.dropout, self.training), self.out_weight, self.out_bias)


class HSTU(nn.Module):
    """The HSTU encoder: raw item rows of B jagged histories -> L2-normalised user embeddings [L, d].

    Row i of the output only depends on rows <= i of the same sequence, so it is the user embedding
    that predicts the item after position i.
    """

    def __init__(self, config: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.checkpointing = config.activation_checkpointing
        self.eps = config.l2_norm_eps
        self.max_seq_len = config.max_seq_len
        self.input = InputLayer(config.max_seq_len, config.embedding_dim, config.dropout, xavier_init=True,
                                device=device)
        self.blocks = nn.ModuleList(HSTUBlock(config, device) for _ in range(config.num_blocks))

    def forward(
        self, item_embeddings: torch.Tensor, timestamps: torch.Tensor, seq_offsets: torch.Tensor,
        prefix: Prefix | None = None,
    ) -> torch.Tensor:
        """item_embeddings [L, d] (table rows, unnormalised), timestamps [L] int64 seconds,
        seq_offsets [B+1] -> [L, d] L2-normalised. With a ``prefix`` (inference), the rows are the new
        tokens after each sequence's cached prefix; their keys and values are recorded in it."""
        x = self.input(item_embeddings, seq_offsets, None if prefix is None else prefix.lengths)
        with per_batch.scope():  # what the attention derives from the batch's layout, once for all blocks
            for block in self.blocks:
                if self.checkpointing and torch.is_grad_enabled() and prefix is None:
                    x = checkpoint(block, x, timestamps, seq_offsets, use_reentrant=False)
                else:
                    x = block(x, timestamps, seq_offsets, prefix)
        return l2_normalize(x, self.eps)
