"""Evaluation one block of items at a time (issue 14): the same numbers as ranking every user against
the whole score matrix (what evaluation did before, ``target_ranks`` over ``scores [B, num_items + 1]``),
on the real ml-latest-small in the default suite and on ML-1M when it can be downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data.loader import make_dataloader
from data.prepare import PreparedDataset, prepare
from data.splits import SeenItems, Split
from models.config import EncoderType, ModelConfig
from models.metrics import RankingMetrics, target_ranks
from models.recommender import GenerativeRecommender
from training.evaluate import evaluate

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-latest-small"
MAX_LEN = 50
MODEL = ModelConfig(encoder=EncoderType.HSTU, max_seq_len=MAX_LEN, embedding_dim=16, num_blocks=1, num_heads=1,
                    attention_dim=16, linear_dim=16, dropout=0.0)


def loader(dataset: PreparedDataset):
    # Under the whole-history rule, rows whose history is longer than the window also carry a window.
    return make_dataloader(dataset, Split.TEST, batch_size=64, max_seq_len=MAX_LEN, seen=SeenItems.HISTORY)


@torch.no_grad()
def whole_matrix_metrics(model: GenerativeRecommender, dataset: PreparedDataset) -> tuple[dict, dict]:
    """The evaluation as it was: every batch's full score matrix, ranks by ``target_ranks``."""
    table = model.embed_items(torch.arange(dataset.num_items + 1)).float()
    table[0] = 0
    acc, window = RankingMetrics(), RankingMetrics()
    for batch in loader(dataset):
        scores = model.encode(batch).float() @ table.T
        keep = batch.user_ids >= 0
        acc.update(target_ranks(scores, batch.targets(), *batch.seen())[keep])
        window.update(target_ranks(scores, batch.targets(), batch.item_ids(), batch.lengths)[keep])
    return acc.compute(), window.compute()


def check(dataset: PreparedDataset) -> None:
    torch.manual_seed(0)
    model = GenerativeRecommender(MODEL, dataset.num_items).eval()
    expected, expected_window = whole_matrix_metrics(model, dataset)
    assert expected != expected_window  # the two rules differ on this data, so both are really compared

    whole = evaluate(model, loader(dataset), dataset.num_items, torch.device("cpu"))
    assert whole.metrics == expected and whole.window_metrics == expected_window  # one block: bit for bit

    # 97 items a block: the target's score is its row's dot product, which may round differently
    # from its column of the block's product (a near-tie then goes the other way).
    blocks = evaluate(model, loader(dataset), dataset.num_items, torch.device("cpu"), block_scores=97 * 64)
    assert blocks.metrics == pytest.approx(expected, abs=2e-3)
    assert blocks.window_metrics == pytest.approx(expected_window, abs=2e-3)


@pytest.mark.skipif(not (SHARED / "ratings.csv").is_file(), reason="no ../shared/data/ml-latest-small")
def test_ml_latest_small_metrics_unchanged_by_item_blocks(tmp_path: Path) -> None:
    check(prepare(SHARED / "ratings.csv", tmp_path))


@pytest.mark.network
def test_ml_1m_metrics_unchanged_by_item_blocks(tmp_path: Path) -> None:
    check(prepare("ml-1m", tmp_path))
