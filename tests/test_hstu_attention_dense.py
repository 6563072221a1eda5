"""The batched PyTorch HSTU attention (CPUs) against the one-sequence-at-a-time reference: forward and
the gradients of q, k, v and both bias tables, on ragged batches with length-1 sequences, with and
without the relative bias and candidate targets, fresh random inputs per case."""

from __future__ import annotations

import pytest
import torch

from models.ops.hstu_attention_dense import hstu_attention_dense
from models.ops.hstu_attention_reference import hstu_attention_reference
from models.ops.relative_bias import RelativeBias, bucket_thresholds, gap_buckets, time_gap_bucket

RTOL = 1e-5


def case(seed: int, *, bias: bool, targets: bool) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 7, (1,), generator=g))
    lengths = [1, *torch.randint(1, 40, (batch,), generator=g).tolist()]
    heads, dqk, dv = int(torch.randint(1, 4, (1,), generator=g)), 8 * int(torch.randint(1, 4, (1,), generator=g)), 16
    total, max_seq_len = sum(lengths), max(lengths) + 3

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.7).requires_grad_()

    args = {"q": rnd(total, heads, dqk), "k": rnd(total, heads, dqk), "v": rnd(total, heads, dv),
            "seq_offsets": torch.tensor([0, *lengths]).cumsum(0), "max_seq_len": max_seq_len,
            "alpha": float(torch.empty(1).uniform_(0.2, 1.5, generator=g)), "rab": None, "num_targets": None}
    if bias:
        args["rab"] = RelativeBias(rnd(2 * max_seq_len - 1), rnd(129),
                                   torch.randint(0, 5000, (total,), generator=g).cumsum(0))
    if targets:  # none, a few and more than the sequence has all occur
        args["num_targets"] = torch.tensor([int(torch.randint(0, n // 3 + 2, (1,), generator=g)) for n in lengths])
    return args, torch.randn(total, heads, dv, generator=g)


def grads(out: torch.Tensor, upstream: torch.Tensor, args: dict) -> list[torch.Tensor]:
    inputs = [args["q"], args["k"], args["v"]]
    if args["rab"] is not None:
        inputs += [args["rab"].pos_weights, args["rab"].time_weights]
    return list(torch.autograd.grad(out, inputs, upstream))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach(), ref.detach()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.parametrize("targets", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_dense_equals_the_reference(seed: int, bias: bool, targets: bool) -> None:
    args, upstream = case(seed, bias=bias, targets=targets)
    ref = hstu_attention_reference(**args)
    got = hstu_attention_dense(**args)
    assert rel_err(got, ref) < RTOL
    for g_got, g_ref in zip(grads(got, upstream, args), grads(ref, upstream, args), strict=True):
        assert rel_err(g_got, g_ref) < RTOL


def test_too_long_a_sequence_is_refused() -> None:
    q = torch.randn(5, 1, 4)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        hstu_attention_dense(q, q, q, torch.tensor([0, 5]), max_seq_len=4, alpha=1.0)


def test_the_integer_bucket_search_equals_the_float64_definition() -> None:
    g = torch.Generator().manual_seed(0)
    thresholds = bucket_thresholds(0.301, 128)[1:129]
    thresholds = thresholds[thresholds < 2**40]  # beyond, float64's ln itself cannot tell neighbours apart
    gaps = torch.cat([torch.arange(-50, 50), thresholds, thresholds - 1, thresholds + 1, -thresholds,
                      torch.randint(-(2**40), 2**40, (20000,), generator=g)])
    assert torch.equal(gap_buckets(gaps, 0.301, 128), time_gap_bucket(gaps, 0.301, 128))
