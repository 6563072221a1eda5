"""Item embeddings (one TorchRec table) and the encoders' input layer.

Example::

    >>> table = item_embedding_collection(num_items=10, embedding_dim=4)
    >>> table.embedding_configs()[0].num_embeddings
    11
    >>> layer = InputLayer(max_seq_len=8, embedding_dim=4, dropout=0.0)
    >>> layer(torch.randn(5, 4), torch.tensor([0, 2, 5])).shape
    torch.Size([5, 4])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection

from data.batch import (
    ITEM_FEATURE,
    NEGATIVE_FEATURE,
    NUM_RATING_BUCKETS,
    RATING_FEATURE,
    TARGET_FEATURE,
)
from models import jagged

ITEM_TABLE = "item_table"
"""Name of the one embedding table; row 0 is padding, rows 1..num_items the items. (Not "items":
EmbeddingCollection keeps its tables in an nn.ModuleDict, which rejects a key named like its ``items``
method.)"""

RATING_TABLE = "rating_table"
"""The optional table of rating-bucket embeddings (``ModelConfig.rating_embeddings``): what the user did
with each item, added to the item's embedding at the input, as HSTU's paper feeds actions beside items."""

ITEM_INIT_STD = 0.02
"""GR initialises item embeddings from a normal(0, 0.02) truncated at two standard deviations."""


INIT_BLOCK_ROWS = 1 << 16
"""Table rows are initialised in blocks of this many, each from its own seeded generator."""


def trunc_normal_(weight: torch.Tensor, std: float) -> torch.Tensor:
    """GR's truncated normal (cut at +-2 std), in place, from the global generator (dense weights)."""
    with torch.no_grad():
        nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
    return weight


def init_table_rows(weight: torch.Tensor, std: float = ITEM_INIT_STD, salt: int = 0) -> torch.Tensor:
    """GR's truncated normal(0, std) for an embedding table, the same for every layout of the table.

    Row r's initial value depends only on the global seed (``torch.initial_seed()``), ``salt`` and r:
    rows are drawn in blocks of ``INIT_BLOCK_ROWS``, each block from its own generator. So one rank
    holding the table and N ranks holding row- or column-wise shards of it start from the same weights,
    and each rank draws only the blocks its shards touch (a 10M-row table is never drawn whole).

    Takes a plain tensor (the whole table) or a ShardedTensor (this rank's shards, with their offsets in
    the table). TorchRec's sharded modules call ``init_fn`` with a bare local slice, whose place in the
    table is unknown here; ``training.distributed.shard_model`` calls it again on the state dict's
    ShardedTensors.
    """
    if weight.dim() != 2:  # a rank that holds no shard of this table gets an empty placeholder
        return weight
    rows, cols = weight.shape
    with torch.no_grad():
        for piece, row0, col0 in _local_pieces(weight):
            if piece.numel() == 0 or piece.device.type == "meta":
                continue
            first, last = row0 // INIT_BLOCK_ROWS, (row0 + piece.shape[0] - 1) // INIT_BLOCK_ROWS
            for block in range(first, last + 1):
                start, end = block * INIT_BLOCK_ROWS, min((block + 1) * INIT_BLOCK_ROWS, rows)
                g = torch.Generator(device=piece.device)
                g.manual_seed(((torch.initial_seed() * 1_000_003 + salt) * 1_000_003 + block) % 2**63)
                values = torch.empty(end - start, cols, device=piece.device, dtype=torch.float32)
                nn.init.trunc_normal_(values, std=std, a=-2 * std, b=2 * std, generator=g)
                lo, hi = max(start, row0), min(end, row0 + piece.shape[0])
                piece[lo - row0 : hi - row0] = values[lo - start : hi - start, col0 : col0 + piece.shape[1]]
    return weight


def _local_pieces(weight: torch.Tensor) -> list[tuple[torch.Tensor, int, int]]:
    """(local tensor, first row, first column) of each part of ``weight`` that this rank holds."""
    if hasattr(weight, "local_shards"):  # ShardedTensor
        return [(s.tensor, *s.metadata.shard_offsets) for s in weight.local_shards()]
    if hasattr(weight, "to_local"):  # DTensor: only whole replicas are expected here
        if weight.to_local().shape != weight.shape:
            raise NotImplementedError("initialising a DTensor shard needs its offsets; shard with ShardedTensor")
        return [(weight.to_local(), 0, 0)]
    return [(weight, 0, 0)]


def init_item_rows(weight: torch.Tensor) -> torch.Tensor:
    """``init_fn`` of the item table: GR's truncated normal, std 0.02."""
    return init_table_rows(weight, ITEM_INIT_STD, salt=1)


def init_rating_rows(weight: torch.Tensor) -> torch.Tensor:
    """``init_fn`` of the rating table (its own generators, so it is not a copy of the first items)."""
    return init_table_rows(weight, ITEM_INIT_STD, salt=2)


def item_embedding_collection(
    num_items: int, embedding_dim: int, device: torch.device | None = None, *, ratings: bool = False
) -> EmbeddingCollection:
    """One table of num_items + 1 rows serving the batch's item keys (history, target, negatives), and
    with ``ratings`` a second, ``RATING_TABLE``, embedding each history event's rating bucket.

    FBGEMM's kernels need a row width that is a multiple of 4, so the table is ``table_dim(d)`` wide
    and the model reads only its first d columns (``item_rows``); the rest stay at their init, unused.

    ``weight_init_min/max`` bound the uniform init that some sharded (fused) kernels use instead of
    ``init_fn``; +-2 std keeps that fallback on the same scale as GR's init.
    """
    table = EmbeddingConfig(
        name=ITEM_TABLE,
        num_embeddings=num_items + 1,
        embedding_dim=table_dim(embedding_dim),
        feature_names=[ITEM_FEATURE, TARGET_FEATURE, NEGATIVE_FEATURE],
        init_fn=init_item_rows,
        weight_init_min=-2 * ITEM_INIT_STD,
        weight_init_max=2 * ITEM_INIT_STD,
    )
    tables = [table]
    if ratings:
        tables.append(
            EmbeddingConfig(
                name=RATING_TABLE,
                num_embeddings=NUM_RATING_BUCKETS,
                embedding_dim=table_dim(embedding_dim),
                feature_names=[RATING_FEATURE],
                init_fn=init_rating_rows,
                weight_init_min=-2 * ITEM_INIT_STD,
                weight_init_max=2 * ITEM_INIT_STD,
            )
        )
    return EmbeddingCollection(tables=tables, device=device)


def table_dim(embedding_dim: int) -> int:
    """The stored row width: d rounded up to a multiple of 4 (FBGEMM's alignment)."""
    return -(-embedding_dim // 4) * 4


def item_rows(values: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """The model's d columns of looked-up table rows (drops FBGEMM's alignment padding)."""
    return values[..., :embedding_dim]


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / max(||x||, eps) over the last dim (GR's L2 post-processor and item normalisation)."""
    return F.normalize(x, dim=-1, eps=eps)


class InputLayer(nn.Module):
    """``dropout(item_embedding * sqrt(d) + position_embedding[position])``, jagged.

    The position is the item's index in its sequence, oldest = 0, as GR's learnable positional
    preprocessor. GR initialises this table differently per encoder (see ``xavier_init``).

    Args:
        max_seq_len: rows of the position table.
        embedding_dim: d.
        dropout: dropout after the sum.
        xavier_init: True for HSTU, whose model-wide xavier_normal_ init in GR overrides the preprocessor's
            own truncated normal(0, sqrt(1/d)); False for SASRec, which skips the preprocessor.
    """

    def __init__(
        self,
        max_seq_len: int,
        embedding_dim: int,
        dropout: float,
        xavier_init: bool = False,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.dropout = dropout
        self.xavier_init = xavier_init
        self.scale = math.sqrt(embedding_dim)
        self.position_embeddings = nn.Parameter(torch.empty(max_seq_len, embedding_dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.xavier_init:
            nn.init.xavier_normal_(self.position_embeddings)
        else:
            trunc_normal_(self.position_embeddings, std=math.sqrt(1.0 / self.position_embeddings.shape[1]))

    def forward(self, item_embeddings: torch.Tensor, seq_offsets: torch.Tensor,
                first_positions: torch.Tensor | None = None) -> torch.Tensor:
        """[L, d] raw item rows -> [L, d] encoder input; sequence b's rows start at position
        ``first_positions[b]`` ([B], the tokens already cached before them; default 0)."""
        pos = jagged.positions(seq_offsets, item_embeddings.shape[0], first_positions)
        x = item_embeddings * self.scale + self.position_embeddings[pos]
        return F.dropout(x, self.dropout, self.training)
