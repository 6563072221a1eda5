"""GenerativeRecommender: one TorchRec item table -> HSTU or SASRec encoder -> sampled-softmax loss.

Every position of every history predicts the next item of its sequence; the last position predicts
the batch's target. Items and users meet as L2-normalised vectors (cosine similarity), in training,
in evaluation (``score_items``) and in serving (``encode_histories`` + ``score_items`` on the exported
table), so the three agree.

Example::

    >>> from data.batch import SeqBatch
    >>> config = ModelConfig(embedding_dim=8, attention_dim=4, linear_dim=4)
    >>> model = GenerativeRecommender(config, num_items=20)
    >>> batch = SeqBatch.from_sequences([[3, 5, 7], [2]], [[10, 20, 30], [5]], targets=[9, 4],
    ...                                 negatives=[1, 11])
    >>> loss, stats = model(batch)
    >>> loss.backward()
    >>> stats["num_labels"].item()  # 3 positions in the first history, 1 in the second
    4.0
    >>> users = model.encode(batch)                       # [2, 8]
    >>> scores = score_items(users, model.embed_items(torch.arange(21)))  # [2, 21], column 0 = -inf
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from data.batch import FEATURES, ITEM_FEATURE, NEGATIVE_FEATURE, RATING_FEATURE, TARGET_FEATURE, SeqBatch
from models import jagged
from models.config import EncoderType, ModelConfig, Negatives
from models.embeddings import item_embedding_collection, item_rows, l2_normalize
from models.hstu import HSTU
from models.loss import in_batch_negatives, sampled_softmax_losses
from models.sasrec import SASRec

Encoder = HSTU | SASRec
"""Both map (item rows [L, d], timestamps [L], seq_offsets [B+1]) -> L2-normalised users [L, d]."""


def build_encoder(config: ModelConfig, device: torch.device | None = None) -> Encoder:
    """The encoder named by ``config.encoder``."""
    return HSTU(config, device) if config.encoder is EncoderType.HSTU else SASRec(config, device)


class GenerativeRecommender(nn.Module):
    """Next-item retrieval model (see docs/architecture.md for the contract).

    Args:
        config: hyper-parameters.
        num_items: items are ids 1..num_items; the table has one more row, 0, for padding.
        device: where to build everything.
        table_device: where to build the embedding tables, if not on ``device``: "meta" lets TorchRec's
            planner shard them before any memory is allocated (DistributedModelParallel then
            materialises each shard on its rank and calls the tables' ``init_fn``, which draws every row
            the same way on any number of ranks). The encoder is built for real, so its initial
            weights come from the global seed alone, not from what sharding the tables drew before.

    Attributes:
        item_embeddings: TorchRec ``EmbeddingCollection``, one table ``ITEM_TABLE`` serving the three
            features.
        encoder: ``HSTU`` or ``SASRec``.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_items: int,
        device: torch.device | None = None,
        table_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.num_items = num_items
        self.item_embeddings = item_embedding_collection(
            num_items, config.embedding_dim, table_device or device, ratings=config.rating_embeddings
        )
        self.encoder = build_encoder(config, device)

    def forward(self, batch: SeqBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean sampled-softmax loss of the next item at every position, and detached stats.

        Kept free of data-dependent Python control flow: TrainPipelineSparseDist fx-traces this method
        to find ``self.item_embeddings(batch.features)`` (the call must take the batch attribute as is).
        """
        losses, labels = self.position_losses(batch)
        num_labels = (labels != 0).sum().to(losses.dtype)
        loss = losses.sum() / num_labels.clamp(min=1)
        return loss, {"loss": loss.detach(), "num_labels": num_labels.detach()}

    def position_losses(self, batch: SeqBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """([L] the loss of each position, [L] its label: the next item, 0 where there is none).

        Position i's loss may depend on events 0..i of its history and on its label's identity,
        nothing later (``tests/test_causality.py``).
        """
        embeddings = self.item_embeddings(batch.features)
        seq_offsets = batch.seq_offsets()
        d = self.config.embedding_dim
        users = self.encoder(self._history_rows(embeddings), batch.timestamps, seq_offsets)

        eps = self.config.l2_norm_eps
        labels = jagged.next_item_labels(batch.item_ids(), batch.targets(), seq_offsets)
        # A label is the item alone, as the negatives and every item scored in evaluation and serving.
        # (With the rating added, each positive carried the next event's rating, which no negative has:
        # the model learned to spot the positive by it and the loss fell towards 0.)
        items = item_rows(embeddings[ITEM_FEATURE].values(), d)
        target_embeddings = item_rows(embeddings[TARGET_FEATURE].values(), d)
        label_embeddings = jagged.next_item_labels(items, target_embeddings, seq_offsets)
        label_embeddings = l2_normalize(label_embeddings, eps)
        if self.config.negatives is Negatives.IN_BATCH:
            negative_ids, negative_embeddings = in_batch_negatives(labels, label_embeddings)
        else:
            negative_ids = batch.negatives()
            torch._assert(negative_ids.numel() > 0, "Negatives.UNIFORM needs the batch's negative pool")
            negative_embeddings = l2_normalize(item_rows(embeddings[NEGATIVE_FEATURE].values(), d), eps)

        losses = sampled_softmax_losses(
            users, labels, label_embeddings, negative_ids, negative_embeddings, self.config.temperature,
            per_position=self.config.negatives_per_position,
        )
        return losses, labels

    def encode(self, batch: SeqBatch) -> torch.Tensor:
        """[B, d] L2-normalised user embedding at each history's last position (predicts the target)."""
        embeddings = self.item_embeddings(batch.features)
        seq_offsets = batch.seq_offsets()
        users = self.encoder(self._history_rows(embeddings), batch.timestamps, seq_offsets)
        return users[jagged.last_positions(seq_offsets)]

    def _history_rows(self, embeddings: dict[str, JaggedTensor]) -> torch.Tensor:
        """[L, d] encoder input rows: the item's embedding, plus its rating's when configured."""
        rows = item_rows(embeddings[ITEM_FEATURE].values(), self.config.embedding_dim)
        if self.config.rating_embeddings:
            rows = rows + item_rows(embeddings[RATING_FEATURE].values(), self.config.embedding_dim)
        return rows

    def embed_items(self, item_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[n, d] L2-normalised embeddings of ``item_ids`` (any shape, flattened) from the same table;
        the raw rows with ``normalize=False`` (what the export stores).

        Goes through the EmbeddingCollection with a one-row KJT carrying the ids as "negative" (every
        key present, as a sharded collection expects), so when sharded all ranks must call it together.
        """
        ids = item_ids.reshape(-1)
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=list(FEATURES),
            values=ids,
            lengths=torch.tensor(
                [ids.numel() if key == NEGATIVE_FEATURE else 0 for key in FEATURES],
                dtype=torch.int64,
                device=ids.device,
            ),
        )
        rows = item_rows(self.item_embeddings(features)[NEGATIVE_FEATURE].values(), self.config.embedding_dim)
        return l2_normalize(rows, self.config.l2_norm_eps) if normalize else rows


def encode_histories(
    encoder: Encoder,
    item_table: torch.Tensor,
    item_ids: torch.Tensor,
    timestamps: torch.Tensor,
    seq_offsets: torch.Tensor,
) -> torch.Tensor:
    """``GenerativeRecommender.encode`` without TorchRec: rows of a plain [num_items + 1, d] table.

    Serving calls this with the exported (unnormalised) table, so its users equal the offline ones.

    Args:
        encoder: the trained ``model.encoder``.
        item_table: [num_items + 1, d] the item table's weight.
        item_ids: [L] histories back to back; timestamps: [L]; seq_offsets: [B+1].

    Returns:
        [B, d] L2-normalised user embeddings at each history's last position.
    """
    users = encoder(item_table[item_ids], timestamps, seq_offsets)
    return users[jagged.last_positions(seq_offsets)]


def score_items(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """[B, num_items + 1] cosine scores of every item for each user; column 0 (padding) is -inf.

    Args:
        users: [B, d] L2-normalised (``encode``/``encode_histories``).
        items: [num_items + 1, d] L2-normalised item embeddings, row 0 included (``embed_items`` of
            ``arange(num_items + 1)``, or ``l2_normalize`` of the exported table).
    """
    scores = users @ items.T
    scores[:, 0] = float("-inf")  # row 0 is padding and must never be recommended
    return scores
