"""SASRec (Kang & McAuley, 2018), the baseline of generative-recommenders' ML-1M table.

One block, as GR's sampled-softmax SASRec, on a padded [B, N, d] batch:

    q   = LN(x)                                                  # no affine, eps 1e-8
    z   = LN(q + MHA(query=q, key=x, value=x, causal))           # attention dropout on the weights
    out = z + Dropout(W2 Dropout(ReLU(W1 z + b1)) + b2)

Same input layer, L2 normalisation and loss as HSTU. Sequences are padded at the end, so the causal
mask alone keeps real positions from seeing padding.

Example::

    >>> from models.config import ModelConfig
    >>> sasrec = SASRec(ModelConfig.sasrec(embedding_dim=8, ffn_hidden_dim=8, max_seq_len=16))
    >>> sasrec(torch.randn(5, 8), torch.zeros(5, dtype=torch.long), torch.tensor([0, 3, 5])).shape
    torch.Size([5, 8])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models import jagged
from models.config import ModelConfig
from models.embeddings import InputLayer, l2_normalize

LAYER_NORM_EPS = 1e-8
"""GR's SASRec LayerNorm epsilon."""


class SASRecBlock(nn.Module):
    """Causal multi-head softmax attention + pointwise FFN. Parameters held directly so that
    ``reset_parameters`` gives GR's init (xavier-normal matrices) on its own."""

    def __init__(self, config: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__()
        d, hidden = config.embedding_dim, config.ffn_hidden_dim
        self.num_heads = config.num_heads
        self.dropout, self.attention_dropout = config.dropout, config.attention_dropout
        self.qkv_weight = nn.Parameter(torch.empty(3 * d, d, device=device))
        self.qkv_bias = nn.Parameter(torch.empty(3 * d, device=device))
        self.out_weight = nn.Parameter(torch.empty(d, d, device=device))
        self.out_bias = nn.Parameter(torch.empty(d, device=device))
        self.ffn_in_weight = nn.Parameter(torch.empty(hidden, d, device=device))
        self.ffn_in_bias = nn.Parameter(torch.empty(hidden, device=device))
        self.ffn_out_weight = nn.Parameter(torch.empty(d, hidden, device=device))
        self.ffn_out_bias = nn.Parameter(torch.empty(d, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GR: xavier_normal_ on every matrix; biases keep their modules' defaults (nn.MultiheadAttention:
        # zeros; the FFN's Conv1d: uniform(+-1/sqrt(fan_in))).
        for w in (self.qkv_weight, self.out_weight, self.ffn_in_weight, self.ffn_out_weight):
            nn.init.xavier_normal_(w)
        nn.init.zeros_(self.qkv_bias)
        nn.init.zeros_(self.out_bias)
        for b, fan_in in ((self.ffn_in_bias, self.ffn_in_weight.shape[1]),
                          (self.ffn_out_bias, self.ffn_out_weight.shape[1])):
            nn.init.uniform_(b, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, d] -> [B, N, d]."""
        b, n, d = x.shape
        h = self.num_heads
        q_in = F.layer_norm(x, (d,), eps=LAYER_NORM_EPS)
        w_q, w_kv = self.qkv_weight.split([d, 2 * d])
        b_q, b_kv = self.qkv_bias.split([d, 2 * d])
        q = F.linear(q_in, w_q, b_q)
        k, v = F.linear(x, w_kv, b_kv).chunk(2, dim=-1)  # GR attends from LN(x) to the raw x
        q, k, v = (t.view(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attention_dropout if self.training else 0.0, is_causal=True
        )
        attn = F.linear(attn.transpose(1, 2).reshape(b, n, d), self.out_weight, self.out_bias)
        z = F.layer_norm(q_in + attn, (d,), eps=LAYER_NORM_EPS)
        hidden = F.relu(F.linear(z, self.ffn_in_weight, self.ffn_in_bias))
        hidden = F.dropout(hidden, self.dropout, self.training)
        ffn = F.linear(hidden, self.ffn_out_weight, self.ffn_out_bias)
        return z + F.dropout(ffn, self.dropout, self.training)


class SASRec(nn.Module):
    """The SASRec encoder, with HSTU's signature: raw item rows [L, d] -> L2-normalised [L, d]."""

    def __init__(self, config: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.checkpointing = config.activation_checkpointing
        self.eps = config.l2_norm_eps
        self.input = InputLayer(config.max_seq_len, config.embedding_dim, config.dropout, device=device)
        self.blocks = nn.ModuleList(SASRecBlock(config, device) for _ in range(config.num_blocks))

    def forward(
        self, item_embeddings: torch.Tensor, timestamps: torch.Tensor, seq_offsets: torch.Tensor
    ) -> torch.Tensor:
        """Same contract as ``HSTU.forward``; ``timestamps`` is unused (SASRec has no time signal)."""
        del timestamps
        total = item_embeddings.shape[0]
        longest = int(seq_offsets.diff().max())  # pads to the batch's longest history, not max_seq_len
        x = jagged.to_padded(self.input(item_embeddings, seq_offsets), seq_offsets, longest)
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return l2_normalize(jagged.from_padded(x, seq_offsets, total), self.eps)
