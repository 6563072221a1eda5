"""The cached (delta) HSTU attention: new tokens against a cached prefix.

Three implementations (the one-sequence-at-a-time reference, the batched PyTorch version, the Triton
kernel) against an independent answer: the full op over whole sequences, whose last rows the cached op
must reproduce. Cases: prefixes of 0 tokens (a prefill), one new token (a decode step), ragged batches,
several sequences sharing one prefix's rows (candidates), with and without the relative bias.
CPU CI runs the kernel in Triton's interpreter in fp32; ``-m gpu`` checks bf16 on CUDA.
Kernel outputs are NaN-poisoned (``poison_outputs``): a row the kernel does not write fails.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from models.ops.hstu_attention import hstu_attention
from models.ops.hstu_attention_cached import (
    CachedPrefix,
    hstu_attention_cached,
    hstu_attention_cached_dense,
    hstu_attention_cached_reference,
)
from models.ops.relative_bias import RelativeBias

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
KERNEL = INTERPRET or HAS_CUDA
DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"


def _case(case_id: str, cached: list[int], new: list[int], *, bias: bool, heads=2, dqk=8, dv=12,
          max_seq_len: int | None = None, shared: bool = False, dtype=torch.float32, device="cpu"):
    """Whole sequences of cached + new tokens, the full op's answer on them, and the cached op's inputs.

    ``shared``: every sequence's prefix is the first sequence's (its rows once in the cache), as when
    candidates are scored after one history."""
    g = torch.Generator().manual_seed(zlib.crc32(case_id.encode()))
    if shared:
        cached = [cached[0]] * len(new)
    lengths = [c + n for c, n in zip(cached, new, strict=True)]
    max_seq_len = max_seq_len or max(lengths)
    total = sum(lengths)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.7).to(device=device, dtype=dtype)

    q, k, v = rnd(total, heads, dqk), rnd(total, heads, dqk), rnd(total, heads, dv)
    ts = torch.randint(0, 5000, (total,), generator=g).cumsum(0).to(device)
    starts = torch.tensor([0, *lengths]).cumsum(0)[:-1].tolist()
    if shared:  # the same prefix rows (keys, values, timestamps) at the head of every sequence
        for s in starts[1:]:
            for t in (k, v, ts):
                t[s : s + cached[0]] = t[: cached[0]]
    rab = None
    if bias:
        rab = RelativeBias((torch.randn(2 * max_seq_len - 1, generator=g) * 0.5).to(device),
                           (torch.randn(65, generator=g) * 0.5).to(device), ts)
    full = hstu_attention(q, k, v, torch.tensor([0, *lengths]).cumsum(0).to(device), max_seq_len, 0.8, rab=rab,
                          impl="pytorch")
    new_rows = torch.cat([torch.arange(s + c, s + c + n) for s, c, n in zip(starts, cached, new, strict=True)])
    if shared:
        cache_rows = torch.arange(cached[0])
        prefix_starts = torch.zeros(len(new), dtype=torch.int64)
    else:
        cache_rows = torch.cat([torch.arange(s, s + c) for s, c in zip(starts, cached, strict=True)])
        prefix_starts = torch.tensor([0, *cached]).cumsum(0)[:-1]
    new_rows, cache_rows = new_rows.to(device), cache_rows.to(device)
    prefix = CachedPrefix(k[cache_rows], v[cache_rows], ts[cache_rows], prefix_starts.to(device),
                          torch.tensor(cached).to(device))
    new_rab = None if rab is None else RelativeBias(rab.pos_weights, rab.time_weights, ts[new_rows])
    args = (q[new_rows], k[new_rows], v[new_rows], torch.tensor([0, *new]).cumsum(0).to(device), prefix,
            max_seq_len, 0.8)
    return args, new_rab, full[new_rows]


CASES = {
    "prefill": ([0, 0], [5, 3]),
    "decode": ([7, 1, 12], [1, 1, 1]),
    "one-token-overall": ([0], [1]),
    "ragged": ([3, 0, 17, 40], [5, 2, 20, 1]),
    "long-prefix": ([70], [3]),
}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    assert not torch.isnan(got).any(), "NaN in the result (an unwritten row?)"
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("bias", [False, True], ids=["plain", "bias"])
@pytest.mark.parametrize("case_id", list(CASES))
def test_reference_and_batched_equal_the_full_ops_last_rows(case_id: str, bias: bool) -> None:
    args, rab, want = _case(case_id, *CASES[case_id], bias=bias)
    assert _rel_err(hstu_attention_cached_reference(*args, rab=rab), want) < 1e-5
    assert _rel_err(hstu_attention_cached_dense(*args, rab=rab), want) < 1e-5
    # The dispatcher with the host bounds given (the CUDA-graph path) computes the same.
    prefix = args[4]
    bounded = (*args[:4], CachedPrefix(prefix.keys, prefix.values, prefix.timestamps, prefix.starts, prefix.lengths,
                                       max(CASES[case_id][0])), *args[5:])
    got = hstu_attention_cached(*bounded, rab=rab, max_new=max(CASES[case_id][1]), impl="pytorch")
    assert _rel_err(got, want) < 1e-5


@pytest.mark.parametrize("bias", [False, True], ids=["plain", "bias"])
def test_sequences_sharing_one_prefix_as_candidates_do(bias: bool) -> None:
    args, rab, want = _case("shared", [9], [1, 1, 1, 1], bias=bias, shared=True)
    assert args[4].keys.shape[0] == 9  # the prefix's rows once, read by all four sequences
    assert _rel_err(hstu_attention_cached_dense(*args, rab=rab), want) < 1e-5
    assert _rel_err(hstu_attention_cached_reference(*args, rab=rab), want) < 1e-5


def test_a_sequence_longer_than_max_seq_len_is_refused() -> None:
    args, rab, _ = _case("too-long", [6], [3], bias=True, max_seq_len=9)
    too_short = (*args[:5], 8, args[6])
    for impl in (hstu_attention_cached_reference, hstu_attention_cached_dense):
        with pytest.raises(ValueError, match="exceed"):
            impl(*too_short, rab=rab)


def test_mismatched_prefix_shapes_are_refused() -> None:
    args, _, _ = _case("shapes", [4], [2], bias=False)
    prefix = args[4]
    wrong = CachedPrefix(prefix.keys[:, :1], prefix.values, prefix.timestamps, prefix.starts, prefix.lengths)
    with pytest.raises(ValueError, match="do not match"):
        hstu_attention_cached(*args[:4], wrong, *args[5:], impl="pytorch")


@pytest.mark.skipif(not KERNEL, reason="the kernel needs CUDA or Triton's interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("bias", [False, True], ids=["plain", "bias"])
@pytest.mark.parametrize("case_id", [*CASES, "shared"])
def test_kernel_equals_the_full_ops_last_rows(case_id: str, bias: bool) -> None:
    from models.ops.hstu_attention_triton import poison_outputs

    cached, new = CASES.get(case_id, ([9], [1, 1, 1, 1]))
    args, rab, want = _case(case_id, cached, new, bias=bias, shared=case_id == "shared", device=DEVICE)
    with poison_outputs():
        got = hstu_attention_cached(*args, rab=rab, impl="triton")
    assert _rel_err(got, want) < (1e-4 if INTERPRET else 2e-3)  # tf32 on a GPU


@pytest.mark.skipif(not KERNEL, reason="the kernel needs CUDA or Triton's interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("seed", range(3))
def test_kernel_random_ragged_batches(seed: int) -> None:
    from models.ops.hstu_attention_triton import poison_outputs

    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 6, (1,), generator=g))
    cached = torch.randint(0, 40, (b,), generator=g).tolist()
    new = torch.randint(1, 24, (b,), generator=g).tolist()
    args, rab, want = _case(f"random-{seed}", cached, new, bias=True, heads=int(torch.randint(1, 4, (1,), generator=g)),
                            dqk=int(torch.randint(4, 33, (1,), generator=g)), device=DEVICE)
    with poison_outputs():
        got = hstu_attention_cached(*args, rab=rab, impl="triton")
    assert _rel_err(got, want) < (1e-4 if INTERPRET else 2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not HAS_CUDA, reason="needs CUDA without TRITON_INTERPRET")
@pytest.mark.parametrize("case_id", [*CASES, "shared"])
def test_gpu_bf16_kernel_against_the_fp32_full_op(case_id: str) -> None:
    cached, new = CASES.get(case_id, ([150], [1] * 32))
    args, rab, want = _case(case_id, cached, new, bias=True, shared=case_id == "shared", dtype=torch.float32,
                            device="cuda", heads=2, dqk=64, dv=64)
    half = tuple(t.bfloat16() if torch.is_tensor(t) and t.is_floating_point() else t for t in args[:4])
    p = args[4]
    prefix = CachedPrefix(p.keys.bfloat16(), p.values.bfloat16(), p.timestamps, p.starts, p.lengths)
    got = hstu_attention_cached(*half, prefix, *args[5:], rab=rab, impl="triton")
    assert _rel_err(got.float(), want) < 2e-2
