"""The Triton HSTU attention kernels against the PyTorch reference.

CPU CI runs them in Triton's interpreter (``TRITON_INTERPRET=1``, set by ``make test``) in fp32,
where kernel and reference must agree to a relative error below 1e-4, forward and backward
(q, k, v and both relative-bias tables).  ``@pytest.mark.gpu`` tests check bf16 parity on CUDA at
sequence lengths up to 4096; run them on a GPU machine without the interpreter:
``python -m pytest -m gpu tests/test_hstu_attention.py``.

Every case draws fresh random inputs from its own seed (derived from the case id, so a failure
reproduces), and every kernel output is allocated NaN-filled (``poison_outputs``): an element the
kernels do not write fails the comparison.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()

if not INTERPRET and not HAS_CUDA:
    pytest.skip("the Triton kernels need CUDA or Triton's CPU interpreter (set TRITON_INTERPRET=1, as "
                "`make test` does)", allow_module_level=True)

from models.ops import hstu_attention_triton as hat  # noqa: E402
from models.ops.hstu_attention import hstu_attention  # noqa: E402
from models.ops.hstu_attention_reference import hstu_attention_reference  # noqa: E402
from models.ops.relative_bias import RelativeBias, bucket_thresholds, time_gap_bucket  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="interpreter (fp32, CPU) case; GPU cases are -m gpu")


def _seed(case_id: str) -> int:
    return zlib.crc32(case_id.encode())


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape
    assert not torch.isnan(got).any(), "NaN in the kernel result (an unwritten element?)"
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def _make_case(seed, lengths, heads, dqk, dv, *, bias, targets, dtype=torch.float32, max_seq_len=None,
               device=DEVICE, sorted_ts=True, huge_ts=False):
    g = torch.Generator().manual_seed(seed)
    L = sum(lengths)
    n_max = max_seq_len or max(max(lengths), 1)
    offsets = torch.tensor([0, *lengths]).cumsum(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.7).to(device=device, dtype=dtype).requires_grad_()

    q, k, v = rnd(L, heads, dqk), rnd(L, heads, dqk), rnd(L, heads, dv)
    rab = None
    if bias:
        gaps = torch.randint(0, 5000, (L,), generator=g)
        ts = gaps.cumsum(0) if sorted_ts else torch.randint(0, 10**7, (L,), generator=g)
        if huge_ts:  # spans > 2^31 s: the kernels' int64 timestamp path
            ts = ts * 1_000_003 + torch.randint(0, 2**40, (L,), generator=g)
        rab = RelativeBias(
            pos_weights=(torch.randn(2 * n_max - 1, generator=g) * 0.5).to(device).requires_grad_(),
            time_weights=(torch.randn(129, generator=g) * 0.5).to(device).requires_grad_(),
            timestamps=ts.to(device),
        )
    num_targets = None
    if targets:
        # 0 targets, a few, and more targets than tokens (every token a target) all occur.
        num_targets = torch.tensor([int(torch.randint(0, max(n // 3, 1) + 2, (1,), generator=g)) for n in lengths])
        num_targets = num_targets.to(device)
    do = torch.randn(L, heads, dv, generator=g).to(device=device, dtype=dtype)
    alpha = float(torch.empty(1).uniform_(0.2, 1.5, generator=g))
    return dict(q=q, k=k, v=v, offsets=offsets.to(device), max_seq_len=n_max, alpha=alpha, rab=rab,
                num_targets=num_targets, do=do)


def _run(case, impl):
    c = case
    inputs = [c["q"], c["k"], c["v"]]
    if c["rab"] is not None:
        inputs += [c["rab"].pos_weights, c["rab"].time_weights]
    kwargs = dict(rab=c["rab"], num_targets=c["num_targets"])
    if impl == "triton":
        with hat.poison_outputs():
            out = hat.hstu_attention_triton(c["q"], c["k"], c["v"], c["offsets"], c["max_seq_len"], c["alpha"],
                                            **kwargs)
            grads = torch.autograd.grad(out, inputs, c["do"])
    else:
        out = hstu_attention_reference(c["q"], c["k"], c["v"], c["offsets"], c["max_seq_len"], c["alpha"],
                                       **kwargs)
        grads = torch.autograd.grad(out, inputs, c["do"])
    return out, grads


def _fp32_copy(case):
    """The same case with fp32 leaves: the reference is evaluated at higher precision than bf16/fp16."""
    def up(t):
        return None if t is None else t.detach().float().requires_grad_(t.requires_grad)

    c = dict(case, q=up(case["q"]), k=up(case["k"]), v=up(case["v"]), do=case["do"].float())
    if case["rab"] is not None:
        r = case["rab"]
        c["rab"] = RelativeBias(up(r.pos_weights), up(r.time_weights), r.timestamps, r.time_bucket_scale)
    return c


def _check(case, tol, names=("out", "dq", "dk", "dv", "d_pos_weights", "d_time_weights")):
    out, grads = _run(case, "triton")
    ref_out, ref_grads = _run(case if case["q"].dtype == torch.float32 else _fp32_copy(case), "pytorch")
    errs = {name: _rel_err(a, b) for name, a, b in zip(names, (out, *grads), (ref_out, *ref_grads), strict=False)}
    bad = {k: e for k, e in errs.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"
    return errs


# ----------------------------------------------------------------------------------------------
# Interpreter (CPU CI): fp32, relative error < 1e-4
# ----------------------------------------------------------------------------------------------

# (lengths, H, Dqk, Dv, bias, targets): ragged batches with lengths 1..200 (1 and 200 included),
# lengths that are not multiples of any block size, a 0-length sequence, padded head dims
# (50 -> 64), Dqk != Dv, with and without the relative bias and num_targets.
CASES = {
    "plain-h1-d16": ([1, 200, 33], 1, 16, 16, False, False),
    "bias-targets-h2-d50": ([77, 1, 150, 0, 19], 2, 50, 50, True, True),
    "bias-h4-dqk64-dv32": ([64, 129, 3], 4, 64, 32, True, False),
    "targets-h3-dqk16-dv50": ([200, 45, 1, 96], 3, 16, 50, False, True),
}


@needs_interpreter
@pytest.mark.parametrize("case_id", list(CASES))
def test_forward_backward_match_reference_fp32(case_id):
    lengths, heads, dqk, dv, bias, targets = CASES[case_id]
    case = _make_case(_seed(case_id), lengths, heads, dqk, dv, bias=bias, targets=targets)
    _check(case, tol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("seed", range(4))
def test_random_batches_match_reference_fp32(seed):
    """Random shapes: 1-6 sequences of 1..200 tokens, 1-4 heads, head dims from {16, 50, 64}."""
    g = torch.Generator().manual_seed(_seed(f"random-{seed}"))

    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=g))]

    lengths = [int(x) for x in torch.randint(1, 201, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g)]
    heads, dqk, dv = pick([1, 2, 3, 4]), pick([16, 50, 64]), pick([16, 50, 64])
    bias, targets = bool(seed & 1), bool(seed & 2)
    case = _make_case(_seed(f"random-{seed}"), lengths, heads, dqk, dv, bias=bias, targets=targets)
    _check(case, tol=1e-4)


@needs_interpreter
def test_unsorted_and_huge_timestamps():
    """Out-of-order timestamps (wide bucket ranges per tile) and gaps beyond 2^31 s (int64 path)."""
    for case_id, huge in (("unsorted", False), ("huge", True)):
        case = _make_case(_seed(case_id), [90, 37], 2, 16, 16, bias=True, targets=True, sorted_ts=False,
                          huge_ts=huge)
        _check(case, tol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("steps", [0, 200])
@pytest.mark.parametrize("sorted_ts", [True, False])
def test_time_bias_by_comparisons_and_by_lookups(steps, sorted_ts, monkeypatch):
    """The two ways a tile gets its time bias, each forced on every tile it can take: per-element
    bucket lookups (HSTU_ATTN_TIME_STEPS=0: only single-bucket tiles compare) and comparisons
    against the tile's bucket boundaries (200 > the 128 buckets: every tile compares), forward and
    backward with both table gradients, time-ordered and shuffled timestamps."""
    monkeypatch.setenv("HSTU_ATTN_TIME_STEPS", str(steps))
    case = _make_case(_seed(f"steps-{steps}-{sorted_ts}"), [97, 1, 64, 130], 2, 16, 16, bias=True, targets=True,
                      sorted_ts=sorted_ts)
    _check(case, tol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("steps", [0, 8, 200])
def test_time_buckets_exact_at_thresholds(steps, monkeypatch):
    """Gaps exactly at and just below each bucket threshold must land in the reference's bucket: the
    kernel's fp32 log estimate is corrected by an integer comparison, and a tile's comparisons
    against its bucket boundaries use the same thresholds."""
    monkeypatch.setenv("HSTU_ATTN_TIME_STEPS", str(steps))
    thresh = bucket_thresholds(0.301, 128)
    gaps = torch.cat([thresh[1:40], thresh[1:40] - 1, torch.tensor([0, 1, 2, 3])])
    n = gaps.numel() + 1
    ts = torch.cat([torch.zeros(1, dtype=torch.int64), gaps.cumsum(0)])  # consecutive gaps = the thresholds
    # Query token i vs key 0 sees dt = ts[i]; make a one-head case where only the bias varies.
    g = torch.Generator().manual_seed(_seed("thresholds"))
    time_weights = torch.randn(129, generator=g)
    rab = RelativeBias(pos_weights=torch.zeros(2 * n - 1), time_weights=time_weights, timestamps=ts)
    q = torch.zeros(n, 1, 16)
    k = torch.zeros(n, 1, 16)
    v = torch.randn(n, 1, 16, generator=g)
    offsets = torch.tensor([0, n])
    with hat.poison_outputs():
        out = hat.hstu_attention_triton(q, k, v, offsets, n, 1.0, rab=rab)
    ref = hstu_attention_reference(q, k, v, offsets, n, 1.0, rab=rab)
    assert _rel_err(out, ref) < 1e-5
    # And the threshold table itself against the float64 definition, for gaps below ~2^40 s (beyond
    # that float64's ln cannot separate neighbouring integers and "the" threshold is not defined).
    for c in range(1, 90):
        t = int(thresh[c])
        assert time_gap_bucket(torch.tensor(t), 0.301, 200) >= c > time_gap_bucket(torch.tensor(t - 1), 0.301, 200)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    case_id = f"half-{dtype}"
    case = _make_case(_seed(case_id), [40, 1, 70], 2, 32, 16, bias=True, targets=True, dtype=dtype)
    _check(case, tol=1e-2)


@needs_interpreter
def test_bias_without_table_gradients_and_dispatcher():
    """impl="triton" through the public op; tables that do not require grad get none."""
    case = _make_case(_seed("dispatch"), [30, 51], 2, 16, 16, bias=True, targets=False)
    case["rab"].pos_weights.requires_grad_(False)
    case["rab"].time_weights.requires_grad_(False)
    c = case
    with hat.poison_outputs():
        out = hstu_attention(c["q"], c["k"], c["v"], c["offsets"], c["max_seq_len"], c["alpha"], rab=c["rab"],
                             impl="triton")
    ref = hstu_attention(c["q"], c["k"], c["v"], c["offsets"], c["max_seq_len"], c["alpha"], rab=c["rab"],
                         impl="pytorch")
    assert _rel_err(out, ref) < 1e-4
    dq, = torch.autograd.grad(out, [c["q"]], c["do"])
    ref_dq, = torch.autograd.grad(ref, [c["q"]], c["do"])
    assert _rel_err(dq, ref_dq) < 1e-4


def test_inference_mode_inputs_as_the_server_passes_them():
    """Serving runs under torch.inference_mode(), whose tensors have no version counter."""
    c = _make_case(_seed("inference"), [7, 1, 40], 2, 16, 16, bias=True, targets=False)
    with torch.inference_mode():
        q, k, v, offsets = (c[n].detach().clone() for n in ("q", "k", "v", "offsets"))
        ref = hstu_attention(q, k, v, offsets, c["max_seq_len"], c["alpha"], rab=c["rab"], impl="pytorch")
        first = hstu_attention(q, k, v, offsets, c["max_seq_len"], c["alpha"], rab=c["rab"], impl="triton")
        offsets[2] = offsets[1] + 20  # changed in place: nothing cached may survive it
        again = hstu_attention(q, k, v, offsets, c["max_seq_len"], c["alpha"], rab=c["rab"], impl="triton")
        ref_again = hstu_attention(q, k, v, offsets, c["max_seq_len"], c["alpha"], rab=c["rab"], impl="pytorch")
    assert _rel_err(first, ref) < 1e-4
    assert _rel_err(again, ref_again) < 1e-4


@needs_interpreter
def test_offsets_not_covering_all_rows_give_zeros():
    case = _make_case(_seed("uncovered"), [20, 11], 1, 16, 16, bias=False, targets=False)
    c = case
    offsets = torch.tensor([3, 20, 31])  # rows 0..2 belong to no sequence
    out = hat.hstu_attention_triton(c["q"], c["k"], c["v"], offsets, 20, c["alpha"])
    ref = hstu_attention_reference(c["q"], c["k"], c["v"], offsets, 20, c["alpha"])
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))
    assert _rel_err(out, ref) < 1e-4


def test_sequence_longer_than_max_seq_len_raises():
    q = torch.randn(10, 1, 16, device=DEVICE)
    offsets = torch.tensor([0, 3, 10], device=DEVICE)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        hat.hstu_attention_triton(q, q, q, offsets, 6, 1.0)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        hstu_attention_reference(q, q, q, offsets, 6, 1.0)


def test_poison_hook_fills_nan():
    like = torch.zeros(2, device=DEVICE)
    with hat.poison_outputs():
        assert torch.isnan(hat._new_output((3, 2), like, covered=True)).all()
    assert not hat._POISON


@needs_interpreter
@pytest.mark.slow
@pytest.mark.parametrize("blocks", [(16, 16, 16, 16), (16, 32, 32, 16)])
def test_larger_batches_and_other_block_shapes(blocks):
    """Longer sequences, D=128, four heads, and other tile shapes (square; BLOCK_N > BLOCK_M)."""
    bm, bn, dkdv_bm, dkdv_bn = blocks
    case_id = f"large-{blocks}"
    g = torch.Generator().manual_seed(_seed(case_id))
    lengths = [int(x) for x in torch.randint(1, 400, (5,), generator=g)] + [1]
    case = _make_case(_seed(case_id), lengths, 4, 128, 128, bias=True, targets=True, max_seq_len=512)
    with hat.kernel_configs(fwd=hat.tile_config(bm, bn, 4, 1), dq=hat.tile_config(bm, bn, 4, 1),
                            dkdv=hat.tile_config(dkdv_bm, dkdv_bn, 4, 1)):
        _check(case, tol=1e-4)


@needs_interpreter
def test_kernel_configs_pins_tiles_and_restores_them_after_an_error():
    """A pinned tile reaches the kernel (a 24-row tile is no power of two, which tl.arange refuses);
    an inner block overrides an outer one, and leaving a block, by an error too, brings back the
    tiles in force before it."""
    c = _make_case(_seed("pinned"), [20, 11], 1, 16, 16, bias=False, targets=False)
    ref = hstu_attention_reference(c["q"], c["k"], c["v"], c["offsets"], c["max_seq_len"], c["alpha"])
    bad, good = hat.tile_config(24, 16, 4, 1), hat.tile_config(16, 16, 4, 1)

    def run():
        return hat.hstu_attention_triton(c["q"], c["k"], c["v"], c["offsets"], c["max_seq_len"], c["alpha"])

    with pytest.raises(Exception, match="power of 2"), hat.kernel_configs(fwd=bad):
        run()
    # A tile taller than the position-bias rows is refused before it could read past them.
    b = _make_case(_seed("tall"), [20], 1, 16, 16, bias=True, targets=False)
    with pytest.raises(ValueError, match="at most 128 query rows"), \
            hat.kernel_configs(fwd=hat.tile_config(256, 16, 4, 1)):
        hat.hstu_attention_triton(b["q"], b["k"], b["v"], b["offsets"], b["max_seq_len"], b["alpha"], rab=b["rab"])
    assert _rel_err(run(), ref) < 1e-4
    with hat.kernel_configs(fwd=bad):
        with hat.kernel_configs(fwd=good):
            assert _rel_err(run(), ref) < 1e-4
        with pytest.raises(Exception, match="power of 2"):
            run()


# ----------------------------------------------------------------------------------------------
# GPU: bf16 parity at realistic lengths
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not HAS_CUDA, reason="needs CUDA without TRITON_INTERPRET")
@pytest.mark.parametrize("n", [256, 1024, 4096])
@pytest.mark.parametrize("variant", ["plain", "bias-targets"])
def test_gpu_bf16_parity(n, variant, monkeypatch):
    if variant != "plain":
        # One configuration per kernel: autotuning the bias variants would spend the test's time
        # compiling candidates (the plain variant is autotuned, as in the benchmark).
        monkeypatch.setenv("HSTU_ATTN_AUTOTUNE", "0")
    case_id = f"gpu-{variant}-{n}"
    g = torch.Generator().manual_seed(_seed(case_id))
    lengths = [n, *(int(x) for x in torch.randint(1, n + 1, (3,), generator=g)), 1]
    case = _make_case(_seed(case_id), lengths, 2, 128, 128, bias=variant != "plain", targets=variant != "plain",
                      dtype=torch.bfloat16, max_seq_len=n, device="cuda")
    errs = _check(case, tol=1e-2)
    print(case_id, {k: f"{e:.2e}" for k, e in errs.items()})
