"""HSTU: one block against a hand-written reference of the paper's formula, and the encoder's jagged
semantics (no leakage between sequences, causality)."""

from __future__ import annotations

import math

import pytest
import torch

from models.config import ModelConfig
from models.hstu import HSTU, HSTUBlock

CONFIG = ModelConfig(embedding_dim=8, num_heads=2, attention_dim=3, linear_dim=4, max_seq_len=7, dropout=0.0)


def silu(x: float) -> float:
    return x / (1 + math.exp(-x))


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + eps)


def time_bucket(dt: int) -> int:
    return min(max(int(math.log(max(abs(dt), 1)) / 0.301), 0), 128)


def reference_block(block: HSTUBlock, x: torch.Tensor, ts: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Padded [B, N, d] inputs, one (sequence, query, key, head) at a time, straight from the formula:
    U,V,Q,K = split(SiLU(LN(x) W)); a_ij = SiLU(q_i.k_j + p[j - i] + w[bucket(t_i - t_j)]) / N for j <= i;
    y_i = x_i + W_o (U_i * LN(sum_j a_ij v_j)) + b_o."""
    h, dqk, dv, n_max = 2, 3, 4, 7
    out = torch.zeros_like(x)
    for b, n in enumerate(lengths):
        proj = [torch.nn.functional.silu(layer_norm(x[b, i]) @ block.uvqk) for i in range(n)]
        u = [p[: h * dv] for p in proj]
        v = [p[h * dv : 2 * h * dv].reshape(h, dv) for p in proj]
        q = [p[2 * h * dv : 2 * h * dv + h * dqk].reshape(h, dqk) for p in proj]
        k = [p[2 * h * dv + h * dqk :].reshape(h, dqk) for p in proj]
        for i in range(n):
            heads = []
            for head in range(h):
                acc = torch.zeros(dv)
                for j in range(i + 1):
                    score = float(q[i][head] @ k[j][head])
                    score += float(block.pos_weights[n_max - 1 + j - i])
                    score += float(block.time_weights[time_bucket(int(ts[b, i] - ts[b, j]))])
                    acc = acc + silu(score) / n_max * v[j][head]
                heads.append(acc)
            gated = u[i] * layer_norm(torch.cat(heads))
            out[b, i] = x[b, i] + block.out_weight @ gated + block.out_bias
    return out


def jagged_inputs(
    lengths: list[int], d: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    x = torch.randn(total, d, generator=g)
    # Sorted, widely spread timestamps so the gaps fall into many different log buckets.
    ts = torch.cat([torch.randint(0, 10**7, (n,), generator=g).sort().values for n in lengths])
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return x, ts, offsets


def test_block_matches_hand_written_reference() -> None:
    torch.manual_seed(0)
    block = HSTUBlock(CONFIG).eval()
    with torch.no_grad():  # larger than GR's init so that a wrong bias index or head split shows
        block.uvqk.normal_(std=0.5)
        block.pos_weights.normal_(std=0.5)
        block.time_weights.normal_(std=0.5)
    lengths = [5, 1, 3]
    x, ts, offsets = jagged_inputs(lengths, d=8)

    got = block(x, ts, offsets)

    padded_x = torch.zeros(3, 5, 8)
    padded_ts = torch.zeros(3, 5, dtype=torch.long)
    for b, (s, e) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)):
        padded_x[b, : e - s], padded_ts[b, : e - s] = x[s:e], ts[s:e]
    with torch.no_grad():
        want = reference_block(block, padded_x, padded_ts, lengths)
    want = torch.cat([want[b, :n] for b, n in enumerate(lengths)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_jagged_batch_equals_sequences_one_at_a_time() -> None:
    torch.manual_seed(0)
    hstu = HSTU(CONFIG).eval()
    lengths = [4, 7, 1, 2]
    x, ts, offsets = jagged_inputs(lengths, d=8, seed=1)

    batched = hstu(x, ts, offsets)

    for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        alone = hstu(x[s:e], ts[s:e], torch.tensor([0, e - s]))
        torch.testing.assert_close(batched[s:e], alone, atol=1e-6, rtol=1e-5)


def test_encoder_is_its_input_layer_then_its_blocks_in_turn_then_l2_normalised() -> None:
    torch.manual_seed(0)
    hstu = HSTU(CONFIG.replace(num_blocks=2)).eval()
    with torch.no_grad():  # as in the block test: large enough that a wrong order or a skipped block shows
        for block in hstu.blocks:
            block.uvqk.normal_(std=0.5)
            block.time_weights.normal_(std=0.5)
    lengths = [3, 1, 2]
    x, ts, offsets = jagged_inputs(lengths, d=8, seed=2)

    got = hstu(x, ts, offsets)

    with torch.no_grad():
        h = hstu.input(x, offsets)
        padded_h, padded_ts = torch.zeros(3, 3, 8), torch.zeros(3, 3, dtype=torch.long)
        for b, (s, e) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)):
            padded_h[b, : e - s], padded_ts[b, : e - s] = h[s:e], ts[s:e]
        for block in hstu.blocks:
            padded_h = reference_block(block, padded_h, padded_ts, lengths)
        want = torch.cat([padded_h[b, :n] for b, n in enumerate(lengths)])
    torch.testing.assert_close(got, want / want.norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("change", ["item", "timestamp"])
def test_causal_later_events_do_not_change_earlier_outputs(change: str) -> None:
    torch.manual_seed(0)
    hstu = HSTU(CONFIG).eval()
    x, ts, offsets = jagged_inputs([6, 3], d=8, seed=2)
    before = hstu(x, ts, offsets)

    x2, ts2 = x.clone(), ts.clone()
    if change == "item":
        x2[4] = torch.randn(8)  # position 4 of the first sequence
    else:
        ts2[4] += 10**6
    after = hstu(x2, ts2, offsets)

    torch.testing.assert_close(after[:4], before[:4], atol=0, rtol=0)
    torch.testing.assert_close(after[6:], before[6:], atol=0, rtol=0)  # the other sequence
    assert not torch.allclose(after[4:6], before[4:6])  # while the change does reach later positions

