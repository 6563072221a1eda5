"""The model's configuration: one dataclass, choices as Enums.

The defaults are generative-recommenders' (GR) ML-1M HSTU setting, the configuration behind the paper's
published ML-1M numbers (configs/ml-1m/hstu-sampled-softmax-n128-final.gin plus the code defaults it
relies on). ``ModelConfig.hstu_large()`` and ``ModelConfig.sasrec()`` give GR's other two ML-1M configs.

Example::

    >>> ModelConfig().num_blocks, ModelConfig.hstu_large().num_blocks
    (2, 8)
    >>> ModelConfig(encoder="sasrec").encoder
    <EncoderType.SASREC: 'sasrec'>
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from models.ops import AttentionImpl


class EncoderType(StrEnum):
    """Which sequence encoder sits between the item embeddings and the loss."""

    HSTU = "hstu"
    SASREC = "sasrec"


class Negatives(StrEnum):
    """Where the sampled softmax takes its negatives from.

    UNIFORM: the batch's shared ``negative`` pool (drawn by the data loader, uniform over items, like GR's
        "local" sampler). IN_BATCH: the distinct labels of all positions of the batch, so popular items
        are negatives more often (GR's "in-batch" sampler, with its de-duplication).
    """

    UNIFORM = "uniform"
    IN_BATCH = "in_batch"


@dataclass
class ModelConfig:
    """Hyper-parameters of ``GenerativeRecommender`` (see ``models.recommender``).

    Attributes:
        encoder: HSTU or SASREC. GR gin ``train_fn.main_module``.
        max_seq_len: longest history the encoder accepts; sizes the position tables. GR
            ``train_fn.max_sequence_length = 200``. (GR also sizes its tables and the attention normaliser
            with room for 11 extra "output" tokens, 211; those extra rows are never used, and the
            normaliser only scales A V ahead of a LayerNorm, so 200 behaves the same up to LayerNorm's eps.)
        embedding_dim: d, of the items and of the residual stream. GR ``item_embedding_dim = 50``.
        num_blocks: GR ``hstu_encoder.num_blocks = 2`` (SASRec: ``sasrec_encoder.num_blocks = 2``).
        num_heads: GR ``num_heads = 1``.
        attention_dim: HSTU Q/K size per head. GR ``hstu_encoder.dqk = 50``.
        linear_dim: HSTU U/V size per head (the width of W_o's input is num_heads * linear_dim).
            GR ``hstu_encoder.dv = 50``.
        ffn_hidden_dim: SASRec's pointwise feed-forward width. GR ``sasrec_encoder.ffn_hidden_dim = 50``.
        dropout: input-embedding dropout and each block's dropout (HSTU: before W_o; SASRec: inside the
            FFN). GR ``train_fn.dropout_rate = 0.2`` and ``hstu_encoder.linear_dropout_rate = 0.2``.
        attention_dropout: dropout on SASRec's softmax attention weights (GR's SASRec uses its FFN
            dropout there, 0.2; see ``sasrec()``). GR's HSTU sets ``attn_dropout_rate = 0.0`` and never
            applies it; the fused HSTU op has none, so HSTU requires 0.
        num_time_buckets: log-time buckets of HSTU's relative bias (129 weights). GR: 128.
        time_bucket_scale: bucket = floor(ln|dt| / scale). GR: 0.301.
        temperature: sampled-softmax temperature. GR ``train_fn.temperature = 0.05``.
        negatives: UNIFORM (GR ``sampling_strategy = "local"``, ``num_negatives = 128``: here the data
            loader's shared pool) or IN_BATCH.
        negatives_per_position: N > 0: each position scores N negatives drawn from the pool (GR's
            128 fresh negatives per position, with the loader's ``num_negatives`` as a larger pool);
            0: every position scores the whole pool.
        l2_norm_eps: floor of the norm when L2-normalising user and item embeddings. GR
            ``train_fn.l2_norm_eps = 1e-6``.
        rating_embeddings: add a learned embedding of each history event's rating (its action) to the
            item embedding at the input; a second TorchRec table. Not in GR's ML-1M config (False).
        activation_checkpointing: recompute each block in backward (torch.utils.checkpoint) to trade
            compute for activation memory. Not in GR's ML-1M config (False).
        attention_impl: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "pytorch".
    """

    encoder: EncoderType = EncoderType.HSTU
    max_seq_len: int = 200
    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    attention_dim: int = 50
    linear_dim: int = 50
    ffn_hidden_dim: int = 50
    dropout: float = 0.2
    attention_dropout: float = 0.0
    num_time_buckets: int = 128
    time_bucket_scale: float = 0.301
    temperature: float = 0.05
    negatives: Negatives = Negatives.UNIFORM
    negatives_per_position: int = 0
    l2_norm_eps: float = 1e-6
    rating_embeddings: bool = False
    activation_checkpointing: bool = False
    attention_impl: AttentionImpl = AttentionImpl.AUTO

    def __post_init__(self) -> None:
        # Configs arrive from YAML as plain strings; turn them into the Enums (a bad name raises here).
        self.encoder = EncoderType(self.encoder)
        self.negatives = Negatives(self.negatives)
        self.attention_impl = AttentionImpl(self.attention_impl)
        for name in ("max_seq_len", "embedding_dim", "num_blocks", "num_heads", "attention_dim", "linear_dim",
                     "ffn_hidden_dim", "num_time_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.negatives_per_position < 0:
            raise ValueError(f"negatives_per_position must be >= 0, got {self.negatives_per_position}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.encoder is EncoderType.HSTU and self.attention_dropout > 0:
            raise ValueError("HSTU's fused attention has no attention dropout; set attention_dropout=0")
        if self.encoder is EncoderType.SASREC and self.embedding_dim % self.num_heads:
            raise ValueError(f"SASRec: num_heads={self.num_heads} must divide d={self.embedding_dim}")

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def hstu_large(cls, **changes: Any) -> ModelConfig:
        """GR's ML-1M HSTU-large: 8 blocks, 2 heads of dqk = dv = 25 (hstu-...-n128-large-final.gin)."""
        return cls(**{"num_blocks": 8, "num_heads": 2, "attention_dim": 25, "linear_dim": 25, **changes})

    @classmethod
    def sasrec(cls, **changes: Any) -> ModelConfig:
        """GR's ML-1M SASRec baseline (sasrec-sampled-softmax-n128-final.gin): 2 blocks, 1 head, FFN 50
        with ReLU, dropout 0.2 in the FFN and (nn.MultiheadAttention's dropout) on attention weights."""
        return cls(**{"encoder": EncoderType.SASREC, "attention_dropout": 0.2, **changes})
