"""Writes a run's unsharded serving artifact (``serving.artifact`` owns the format)."""

from __future__ import annotations

import numpy as np
import torch

from data.prepare import PreparedDataset
from models.recommender import GenerativeRecommender
from serving.artifact import save_artifact
from serving.histories import UserHistories
from training.config import TrainConfig, to_dict
from training.distributed import DistContext


@torch.no_grad()
def export_run(
    model: GenerativeRecommender,
    cfg: TrainConfig,
    dataset: PreparedDataset,
    path,
    ctx: DistContext,
    metrics: dict[str, float],
) -> None:
    """Gathers the full item table through the (possibly sharded) collection on every rank and
    writes the artifact from rank 0."""
    model.eval()
    ids = torch.arange(1, dataset.num_items + 1, device=ctx.device)
    rows = model.embed_items(ids, normalize=False).float().cpu()
    table = torch.cat([torch.zeros(1, rows.shape[1]), rows])
    if not ctx.is_main:
        return
    # The known users' histories: the packed arrays as they are (dense ids, the same as the export's).
    packed = dataset.packed
    users = UserHistories(dataset.raw_users.astype(str).to_numpy(), np.asarray(packed.offsets),
                          np.asarray(packed.items), np.asarray(packed.timestamps))
    items = dataset.items[["item_id", "raw_item"]].assign(raw_item=lambda f: f["raw_item"].astype(str))
    items["title"] = dataset.items.get("title")
    save_artifact(
        path,
        model_config=cfg.model,
        encoder_state=model.encoder.state_dict(),
        item_embeddings=table,
        items=items,
        users=users,
        metadata={"version": path.parent.name, "metrics": metrics, "train_config": to_dict(cfg)},
        exclude_seen=cfg.data.exclude_seen,
    )
