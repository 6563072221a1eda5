"""GenerativeRecommender on SeqBatch with an unsharded EmbeddingCollection: labels, training, activation
checkpointing, encode/embed_items/serving parity, fx-traceability for TorchRec's pipeline, meta init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F

from data.batch import SeqBatch
from models.config import EncoderType, ModelConfig, Negatives
from models.embeddings import ITEM_TABLE, RATING_TABLE
from models.loss import sampled_softmax_loss
from models.recommender import GenerativeRecommender, encode_histories, score_items

NUM_ITEMS = 30
HSTU_CONFIG = ModelConfig(embedding_dim=16, attention_dim=8, linear_dim=8, num_heads=2, max_seq_len=12)
SASREC_CONFIG = ModelConfig.sasrec(embedding_dim=16, ffn_hidden_dim=16, num_heads=2, max_seq_len=12)
CONFIGS = {"hstu": HSTU_CONFIG, "sasrec": SASREC_CONFIG}


def make_batch(seed: int = 0, batch_size: int = 4, pool: int = 16, unknown_target: bool = False) -> SeqBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (batch_size,), generator=g).tolist()
    items = [torch.randint(1, NUM_ITEMS + 1, (n,), generator=g).tolist() for n in lengths]
    times = [torch.randint(0, 10**6, (n,), generator=g).sort().values.tolist() for n in lengths]
    targets = torch.randint(1, NUM_ITEMS + 1, (batch_size,), generator=g)
    if unknown_target:
        targets[0] = 0
    negatives = torch.randint(1, NUM_ITEMS + 1, (pool,), generator=g)
    return SeqBatch.from_sequences(items, times, targets=targets.tolist(), negatives=negatives)


def table(model: GenerativeRecommender) -> torch.Tensor:
    return model.item_embeddings.embeddings[ITEM_TABLE].weight


@pytest.mark.parametrize("negatives", list(Negatives))
@pytest.mark.parametrize("encoder", list(CONFIGS))
def test_forward_backward(encoder: str, negatives: Negatives) -> None:
    torch.manual_seed(0)
    model = GenerativeRecommender(CONFIGS[encoder].replace(negatives=negatives), NUM_ITEMS)
    batch = make_batch()

    loss, stats = model(batch)
    loss.backward()

    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    assert set(stats) == {"loss", "num_labels"} and not stats["loss"].requires_grad
    assert stats["num_labels"].item() == batch.lengths.sum().item()
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    used = set(batch.item_ids().tolist()) | set(batch.targets().tolist())
    if negatives is Negatives.UNIFORM:
        used |= set(batch.negatives().tolist())
    touched = set(table(model).grad.abs().sum(1).nonzero().flatten().tolist())
    assert touched <= used and 0 not in touched


@pytest.mark.parametrize("encoder", list(CONFIGS))
def test_loss_predicts_next_item_and_the_target_at_the_last_position(encoder: str) -> None:
    torch.manual_seed(0)
    model = GenerativeRecommender(CONFIGS[encoder], NUM_ITEMS).eval()
    batch = make_batch(seed=1)

    loss, _ = model(batch)

    # Labels spelled out from the Python lists: history[1:] + [target] per sequence.
    labels = torch.tensor([x for seq, t in zip(batch.sequences(), batch.targets().tolist(), strict=True)
                           for x in [*seq[1:], t]])
    w = table(model)
    users = model.encoder(w[batch.item_ids()], batch.timestamps, batch.seq_offsets())
    pool = batch.negatives()
    want, _ = sampled_softmax_loss(users, labels, F.normalize(w[labels], dim=-1), pool,
                                   F.normalize(w[pool], dim=-1), model.config.temperature)
    torch.testing.assert_close(loss, want)


def test_unknown_target_is_not_a_label() -> None:
    model = GenerativeRecommender(HSTU_CONFIG, NUM_ITEMS)
    batch = make_batch(unknown_target=True)
    _, stats = model(batch)
    assert stats["num_labels"].item() == batch.lengths.sum().item() - 1


def test_uniform_negatives_need_a_pool() -> None:
    model = GenerativeRecommender(HSTU_CONFIG, NUM_ITEMS)
    with pytest.raises(AssertionError, match="negative pool"):
        model(make_batch(pool=0))


@pytest.mark.parametrize("encoder", list(CONFIGS))
def test_a_few_steps_learn_a_deterministic_sequence(encoder: str) -> None:
    """Item i is always followed by i + 1 (cyclically): the loss must fall well below its start."""
    torch.manual_seed(0)
    model = GenerativeRecommender(CONFIGS[encoder].replace(dropout=0.0, attention_dropout=0.0), 12)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        starts = torch.randint(1, 13, (8,), generator=g).tolist()
        lengths = torch.randint(3, 9, (8,), generator=g).tolist()
        seqs = [[(s + k - 1) % 12 + 1 for k in range(n + 1)] for s, n in zip(starts, lengths, strict=True)]
        batch = SeqBatch.from_sequences(
            [s[:-1] for s in seqs], [list(range(0, 60 * (len(s) - 1), 60)) for s in seqs],
            targets=[s[-1] for s in seqs], negatives=torch.randint(1, 13, (8,), generator=g),
        )
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("encoder", list(CONFIGS))
def test_activation_checkpointing_gives_the_same_gradients(encoder: str) -> None:
    torch.manual_seed(0)
    config = CONFIGS[encoder].replace(dropout=0.3)  # dropout on, so recomputation must replay the RNG
    plain = GenerativeRecommender(config, NUM_ITEMS)
    ckpt = GenerativeRecommender(config.replace(activation_checkpointing=True), NUM_ITEMS)
    ckpt.load_state_dict(plain.state_dict())
    batch = make_batch(seed=2)

    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(123)
        loss, _ = model(batch)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})

    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


@pytest.mark.parametrize("encoder", list(CONFIGS))
def test_encode_embed_items_and_serving_path_agree_with_forward(encoder: str) -> None:
    torch.manual_seed(0)
    model = GenerativeRecommender(CONFIGS[encoder], NUM_ITEMS).eval()
    batch = make_batch(seed=3)
    w = table(model)

    users = model.encode(batch)
    all_positions = model.encoder(w[batch.item_ids()], batch.timestamps, batch.seq_offsets())
    torch.testing.assert_close(users, all_positions[batch.seq_offsets()[1:] - 1])
    torch.testing.assert_close(users.norm(dim=-1), torch.ones(len(users)))

    # Serving: a plain exported table, no TorchRec, gives the same users.
    exported = w.detach().clone()
    served = encode_histories(model.encoder, exported, batch.item_ids(), batch.timestamps,
                              batch.seq_offsets())
    torch.testing.assert_close(served, users)

    ids = torch.tensor([[3, 1], [7, 3]])
    torch.testing.assert_close(model.embed_items(ids), F.normalize(w[ids.flatten()], dim=-1))
    torch.testing.assert_close(model.embed_items(ids, normalize=False), w[ids.flatten()])

    items = model.embed_items(torch.arange(NUM_ITEMS + 1))
    scores = score_items(users, items)
    assert scores.shape == (batch.batch_size, NUM_ITEMS + 1)
    assert torch.isneginf(scores[:, 0]).all()
    torch.testing.assert_close(scores[:, 1:], users @ items[1:].T)

    # With one-item histories the forward loss is exactly the target term: encode x embed_items.
    short = SeqBatch.from_sequences([[4], [9]], [[10], [20]], targets=[5, 2], negatives=[1, 2, 8])
    loss, _ = model(short)
    targets, pool = short.targets(), short.negatives()
    want, _ = sampled_softmax_loss(model.encode(short), targets, model.embed_items(targets), pool,
                                   model.embed_items(pool), model.config.temperature)
    torch.testing.assert_close(loss, want)


def test_forward_is_fx_traceable_with_the_lookup_on_the_batch_attribute() -> None:
    """What TrainPipelineSparseDist needs: with the (sharded) collection and the encoder as leaves, the
    forward traces, and the collection's input is ``batch.features`` itself."""

    class PipelineLikeTracer(torch.fx.Tracer):
        def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
            return qualname in ("item_embeddings", "encoder") or super().is_leaf_module(m, qualname)

    for config in (HSTU_CONFIG, HSTU_CONFIG.replace(negatives=Negatives.IN_BATCH), SASREC_CONFIG):
        graph = PipelineLikeTracer().trace(GenerativeRecommender(config, NUM_ITEMS))
        lookups = [n for n in graph.nodes if n.op == "call_module" and n.target == "item_embeddings"]
        assert len(lookups) == 1
        (arg,) = lookups[0].args
        assert arg.op == "call_function" and arg.args[1] == "features"  # getattr(batch, "features")
        assert arg.args[0].op == "placeholder"


def test_meta_device_build_then_materialise_like_distributed_model_parallel() -> None:
    config = ModelConfig()  # GR's ML-1M sizes, so the init statistics are meaningful
    model = GenerativeRecommender(config, num_items=3706, device=torch.device("meta"))
    assert all(p.is_meta for p in model.parameters())

    # DMP (dense part): give each module that owns meta parameters real memory, then reset_parameters().
    for module in model.encoder.modules():
        own = list(module.parameters(recurse=False))
        if own:
            module.to_empty(device="cpu", recurse=False)
            for p in module.parameters(recurse=False):
                p.data.fill_(math.nan)
            module.reset_parameters()
    assert all(torch.isfinite(p).all() for p in model.encoder.parameters())

    # GR's init: uvqk ~ N(0, 0.02); HSTU's position table xavier-normal (std sqrt(2 / (200 + 50))).
    assert abs(model.encoder.blocks[0].uvqk.std().item() - 0.02) < 0.002
    assert abs(model.encoder.input.position_embeddings.std().item() - math.sqrt(2 / 250)) < 0.005

    # The same model built for real: the item table is GR's truncated normal (0.02, cut at 2 std).
    w = table(GenerativeRecommender(config, num_items=3706))
    assert w.abs().max().item() <= 0.04 and abs(w.std().item() - 0.02 * 0.88) < 0.001


def test_config_from_strings() -> None:
    config = ModelConfig(encoder="sasrec", negatives="in_batch", attention_impl="pytorch",
                         attention_dropout=0.2)
    assert config.encoder is EncoderType.SASREC and config.negatives is Negatives.IN_BATCH
    with pytest.raises(ValueError):
        ModelConfig(encoder="transformer")
    with pytest.raises(ValueError, match="attention dropout"):
        ModelConfig(attention_dropout=0.1)


def test_rating_embeddings_are_a_second_table_that_changes_the_users() -> None:
    config = ModelConfig(embedding_dim=8, attention_dim=4, linear_dim=4, dropout=0.0, rating_embeddings=True)
    torch.manual_seed(0)
    model = GenerativeRecommender(config, num_items=20).eval()
    assert set(model.item_embeddings.embeddings.keys()) == {ITEM_TABLE, RATING_TABLE}
    items, times = [[3, 5, 7], [2]], [[10, 20, 30], [5]]
    liked = model.encode(SeqBatch.from_sequences(items, times, ratings=[[5.0, 5.0, 5.0], [5.0]]))
    disliked = model.encode(SeqBatch.from_sequences(items, times, ratings=[[1.0, 1.0, 1.0], [1.0]]))
    assert not torch.allclose(liked, disliked)
    batch = SeqBatch.from_sequences(items, times, targets=[9, 4], negatives=[1, 11], ratings=[[4.0] * 3, [2.0]])
    loss, _ = model(batch)
    loss.backward()
    assert model.item_embeddings.embeddings[RATING_TABLE].weight.grad is not None
