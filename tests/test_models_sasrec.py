"""SASRec: the block against nn.MultiheadAttention wired as GR wires it, shapes, padding and causality."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.config import ModelConfig
from models.sasrec import SASRec, SASRecBlock

CONFIG = ModelConfig.sasrec(embedding_dim=8, num_heads=2, ffn_hidden_dim=6, max_seq_len=10, dropout=0.0,
                            attention_dropout=0.0)


def test_block_matches_multihead_attention_reference() -> None:
    torch.manual_seed(0)
    block = SASRecBlock(CONFIG).eval()
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.qkv_weight)
        mha.in_proj_bias.copy_(torch.randn(24))
        block.qkv_bias.copy_(mha.in_proj_bias)
        mha.out_proj.weight.copy_(block.out_weight)
        mha.out_proj.bias.copy_(block.out_bias)
    x = torch.randn(2, 5, 8)

    # GR: queries from LN(x), keys/values from x; z = LN(q + attn); out = z + FFN(z).
    q = F.layer_norm(x, (8,), eps=1e-8)
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    attn, _ = mha(q, x, x, attn_mask=causal, need_weights=False)
    z = F.layer_norm(q + attn, (8,), eps=1e-8)
    hidden = torch.relu(z @ block.ffn_in_weight.T + block.ffn_in_bias)
    want = z + hidden @ block.ffn_out_weight.T + block.ffn_out_bias

    torch.testing.assert_close(block(x), want, atol=1e-5, rtol=1e-4)


def test_jagged_shapes_unit_norm_and_no_leakage_through_padding() -> None:
    torch.manual_seed(0)
    sasrec = SASRec(CONFIG).eval()
    lengths = [4, 1, 6]
    offsets = torch.tensor([0, 4, 5, 11])
    x, ts = torch.randn(11, 8), torch.zeros(11, dtype=torch.long)

    out = sasrec(x, ts, offsets)

    assert out.shape == (11, 8)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(11))
    for s, n in zip(offsets[:-1].tolist(), lengths, strict=True):
        alone = sasrec(x[s : s + n], ts[s : s + n], torch.tensor([0, n]))
        torch.testing.assert_close(out[s : s + n], alone, atol=1e-6, rtol=1e-5)


def test_causal_later_items_do_not_change_earlier_outputs() -> None:
    torch.manual_seed(0)
    sasrec = SASRec(CONFIG).eval()
    offsets = torch.tensor([0, 6])
    x, ts = torch.randn(6, 8), torch.zeros(6, dtype=torch.long)
    before = sasrec(x, ts, offsets)
    x[4] = torch.randn(8)
    after = sasrec(x, ts, offsets)
    torch.testing.assert_close(after[:4], before[:4], atol=0, rtol=0)
    assert not torch.allclose(after[4:], before[4:])
