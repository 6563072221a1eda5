"""Triton kernels for jagged causal HSTU attention, forward and backward.

Per sequence and head (positions i, j inside the sequence)::

    s_ij   = alpha * q_i . k_j + bias(i, j)                 bias from RelativeBias, optional
    out_i  = sum_{j allowed(i)} SiLU(s_ij) / max_seq_len * v_j

``allowed(i)`` is causal over the history; each of the last ``num_targets[b]`` tokens sees the
history and itself only (``hstu_attention_reference.allowed_mask``).

Design (what differs from a softmax flash-attention, and why):

* No softmax means no running max/sum: every key block contributes independently, so the forward is
  a plain ``acc += silu(Q K^T) V`` loop and the backward needs no row statistics from the forward.
  The ``1 / max_seq_len`` factor is applied once to the fp32 accumulators, not per element.
* SiLU is written in terms of ``h = s / 2``: ``silu(s) = h (1 + tanh h)`` and
  ``silu'(s) = (1 + tanh h)(1 + h (1 - tanh h)) / 2``.  On GPU with 16-bit inputs the tanh is one
  ``tanh.approx`` instruction on the special-function unit, whose work sits on every tile's
  critical path; exp + reciprocal would cost it twice (H200, N=4096 forward: 4.8 vs 6.9 ms).
  fp32 inputs and Triton's CPU interpreter use the exact ``1 / (1 + exp(-s))`` form.
* Causality is exploited by the loop bounds: key blocks that no row of a query block can see are
  never loaded, and only blocks that straddle the diagonal (or the num_targets boundary) evaluate
  the element mask.  With targets, the key blocks between the history and the diagonal are skipped.
* The relative bias is recomputed in the kernel from ``pos_weights`` [2N-1], ``time_weights`` [B+1]
  and the token timestamps; no [N, N] tensor exists.  Position: a tile's bias depends on j - i only,
  so it is read as a strided tile of ``_pos_rows`` (the table copied once per row, each row shifted
  by one place): contiguous, aligned loads instead of a gather per element.  Time: buckets are exact
  integer comparisons against a host-computed table of thresholds, so kernel and reference agree on
  every bucket (for gaps below ~2^40 s, beyond which float64's ln itself cannot separate
  neighbouring integers).  A tile whose gaps span at most ``HSTU_ATTN_TIME_STEPS`` buckets (tiles
  away from the diagonal of a time-ordered sequence) compares each element against those few
  thresholds; wider tiles estimate ``floor(ln dt / scale)`` in fp32 per element, correct it with one
  comparison and look the weight up.
* Backward = two deterministic kernels: one program per key block accumulates dK, dV (and the bias
  gradients), one per query block accumulates dQ.  No atomics on dQ/dK/dV.  The two bias-table
  gradients are reduced inside each program before touching global memory: the position gradient
  per tile by summing the diagonals of dS (one atomic per relative position and tile), the
  time gradient in a per-program register histogram (one atomic per bucket and program).
* Programs are ordered heaviest first (longest rows of the longest sequences) so the tail of the
  grid is made of short programs.

Knobs (environment, read per call): ``HSTU_ATTN_AUTOTUNE=0`` uses the first candidate config of each
kernel instead of autotuning (saves compile time); ``HSTU_ATTN_SILU=exact|tanh`` picks the
16-bit SiLU evaluation (default ``tanh``); ``HSTU_ATTN_TIME_STEPS=n`` (default 8) is the widest
bucket range a tile evaluates by comparisons (0: lookups unless the tile holds one bucket).
Under ``TRITON_INTERPRET=1`` one small fixed config is used.
In code, ``with kernel_configs(fwd=tile_config(...)):`` pins a kernel's config (sweeps, tests).
Results and measurements: docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from models.ops.hstu_attention import tuning_length
from models.ops.per_batch import cached
from models.ops.relative_bias import RelativeBias, bucket_thresholds

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# SiLU evaluation modes (constexpr SILU_MODE).
SILU_EXACT = 0  # 1 / (1 + exp(-s)): fp32 inputs, CPU interpreter
SILU_TANH = 1  # tanh.approx.f32: one special-function op per element
_SILU_BY_NAME = {"exact": SILU_EXACT, "tanh": SILU_TANH}


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tanh_approx(h):
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [h], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _silu_of_half(h, SILU_MODE: tl.constexpr):
    """silu(2h) for h = s / 2."""
    if SILU_MODE == 0:
        return (2.0 * h) / (1.0 + tl.exp(-2.0 * h))
    else:
        t = _tanh_approx(h)
        return h + h * t


@triton.jit
def _silu_and_grad_of_half(h, SILU_MODE: tl.constexpr):
    """(silu(s), silu'(s)) for h = s / 2."""
    if SILU_MODE == 0:
        s = 2.0 * h
        sig = 1.0 / (1.0 + tl.exp(-s))
        return s * sig, sig * (1.0 + s * (1.0 - sig))
    else:
        t = _tanh_approx(h)
        one_t = 1.0 + t
        return h * one_t, 0.5 * one_t * (1.0 + h * (1.0 - t))


@triton.jit
def _silu_grad_of_half(h, SILU_MODE: tl.constexpr):
    """silu'(s) for h = s / 2."""
    if SILU_MODE == 0:
        s = 2.0 * h
        sig = 1.0 / (1.0 + tl.exp(-s))
        return sig * (1.0 + s * (1.0 - sig))
    else:
        t = _tanh_approx(h)
        return 0.5 * (1.0 + t) * (1.0 + h * (1.0 - t))


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr):
    """tl.dot with fp32 accumulation.  DOT_PREC "upcast" is for Triton's CPU interpreter, whose dot
    cannot multiply bf16 (it stores bf16 as raw 16-bit integers): the exact fp32 upcast is used."""
    if DOT_PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _log2(x, FAST: tl.constexpr):
    if FAST:  # one special-function op; its ~1e-7 relative error is far inside the bucket correction
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _gap_bucket(THRESH, gap, log2_to_bucket, num_buckets, FAST: tl.constexpr):
    """The exact time bucket of gaps ``gap`` >= 0 (a tensor or a scalar).

    The estimate c = round(ln(dt) / scale) is within 1/2 of the exact real value, so the exact floor
    is c - 1 or c, and ``dt >= THRESH[c]`` (the smallest gap whose reference bucket is >= c) picks
    the right one.  THRESH[num_buckets + 1] is "never", which also clamps at the top.
    """
    dt = tl.maximum(gap, 1)
    x = _log2(dt.to(tl.float32), FAST) * log2_to_bucket
    c = tl.minimum(tl.floor(x + 0.5).to(tl.int32), num_buckets + 1)
    return c - 1 + (dt >= tl.load(THRESH + c)).to(tl.int32)


@triton.jit
def _rel_bias(POS_W, TIME_W, THRESH, i, j, ts_i, ts_j, max_seq_len, log2_to_bucket, num_buckets,
              FAST: tl.constexpr):
    """bias(i, j) and the time bucket by per-element table lookups, for broadcastable positions i
    (query) and j (key), already clamped to [0, seq_len) (the cached-prefix kernel's form)."""
    bias = tl.load(POS_W + (j - i + (max_seq_len - 1))).to(tl.float32)
    bucket = _gap_bucket(THRESH, tl.abs(ts_i - ts_j), log2_to_bucket, num_buckets, FAST)
    bias += tl.load(TIME_W + bucket).to(tl.float32)
    return bias, bucket


@triton.jit
def _pos_bias(POS_ROWS, stride_pr, rows, cols, shift):
    """The position bias of a tile: element (r, c) of a tile whose key block starts ``shift - x0``
    positions after its query block (r, c tile-local; broadcastable) is POS_ROWS[r, shift + c].

    Each row of POS_ROWS is the position table shifted by one more place (``_pos_rows``), so the tile
    is a plain strided load, contiguous and aligned along c: no per-element gather."""
    return tl.load(POS_ROWS + rows * stride_pr + shift + cols).to(tl.float32)


@triton.jit
def _gap_range(lo_a, hi_a, ts_b):
    """(smallest, largest) |t_a - t_b| between timestamps in [lo_a, hi_a] and the 1-D ``ts_b``."""
    lo_b = tl.min(ts_b, axis=0)
    hi_b = tl.max(ts_b, axis=0)
    return tl.maximum(tl.maximum(lo_a - hi_b, lo_b - hi_a), 0), tl.maximum(hi_a - lo_b, hi_b - lo_a)


@triton.jit
def _time_bias(TIME_W, THRESH, dt, gap_lo, gap_hi, log2_to_bucket, num_buckets, FAST: tl.constexpr,
               TIME_STEPS: tl.constexpr):
    """time_weights[bucket(dt)] over a tile whose gaps all lie in [gap_lo, gap_hi], and the tile's
    bucket range (b_lo, b_hi).

    Buckets are monotone in the gap, so every element's bucket is within [b_lo, b_hi].  When that
    range holds at most TIME_STEPS boundaries (tiles away from the diagonal, in time-ordered
    sequences), each boundary is one integer comparison and one select per element against
    scalars: no logarithm and no gather.  Wider ranges take the per-element estimate and lookups.
    """
    b_lo = _gap_bucket(THRESH, gap_lo, log2_to_bucket, num_buckets, False)
    b_hi = _gap_bucket(THRESH, gap_hi, log2_to_bucket, num_buckets, False)
    if b_hi - b_lo <= TIME_STEPS:
        tb = tl.zeros(dt.shape, dtype=tl.float32) + tl.load(TIME_W + b_lo).to(tl.float32)
        for c in range(b_lo + 1, b_hi + 1):
            tb = tl.where(dt >= tl.load(THRESH + c), tl.load(TIME_W + c).to(tl.float32), tb)
    else:
        tb = tl.load(TIME_W + _gap_bucket(THRESH, dt, log2_to_bucket, num_buckets, FAST)).to(tl.float32)
    return tb, b_lo, b_hi


@triton.jit
def _program_tile(MAX_LEN, BLOCK: tl.constexpr):
    """(sequence*heads + head, block index) of this program in the 1-D grid.

    The block index varies fastest, so the programs on the GPU at one time are mostly the blocks
    of a few (sequence, head) pairs and share those pairs' keys and values in L2.  A grid with
    the pair varying fastest makes every resident program stream a different pair's K/V from
    HBM: 434 against 474 TFLOP/s for the forward at N=4096 on an H200 (docs/benchmarks.md).
    """
    blocks = tl.cdiv(MAX_LEN, BLOCK)
    pid = tl.program_id(0)
    return pid // blocks, pid % blocks


@triton.jit
def _allowed(i, j, hist, HAS_TARGETS: tl.constexpr):
    """May query i see key j?  Causal; a target row (i >= hist) sees the history and itself."""
    ok = j <= i
    if HAS_TARGETS:
        ok = ok & ((i < hist) | (j < hist) | (j == i))
    return ok


@triton.jit
def _load_tile(ptrs, rows_ok, d_ok, ROW_MASK: tl.constexpr, D_MASK: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; out-of-range rows and padded head-dim columns read as 0
    (zeros make padded rows/columns contribute nothing and can never be NaN)."""
    if ROW_MASK:
        if D_MASK:
            return tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            return tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        if D_MASK:
            return tl.load(ptrs, mask=d_ok[None, :], other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _key_ranges(start_m, seq_len, hist, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_TARGETS: tl.constexpr):
    """Key-block ranges for a query block [start_m, start_m + BLOCK_M).

    Returns (full_end, a_end, b_start, hi): keys [0, full_end) need no mask, [full_end, a_end)
    and [b_start, hi) need the element mask, everything else is invisible to every row.
    """
    hi = tl.minimum(start_m + BLOCK_M, seq_len)
    full_end = (tl.minimum(start_m, hist) // BLOCK_N) * BLOCK_N
    if HAS_TARGETS:
        # Key blocks starting at/after ceil(hist) hold only target keys, which are visible to their
        # own row alone: only the blocks that reach the diagonal are needed.
        dead_lo = tl.cdiv(hist, BLOCK_N) * BLOCK_N
        a_end = tl.minimum(hi, dead_lo)
        b_start = tl.maximum(a_end, (start_m // BLOCK_N) * BLOCK_N)
    else:
        a_end = hi
        b_start = hi
    return full_end, a_end, b_start, hi


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


# Integer arguments that change from batch to batch. Triton compiles a variant of a kernel for an
# integer that is 1 or a multiple of 16; a server meeting such a batch for the first time would stall
# for the compilation, so these are passed as plain integers.
_PER_BATCH = ["MAX_LEN"]


@triton.jit
def _fwd_tile(
    acc, q, k_base, v_base, start_m, start_n, offs_m, offs_r, offs_n, offs_dq, offs_dv, seq_len, hist, ts_q,
    q_ts_lo, q_ts_hi, TS_base, POS_ROWS, TIME_W, THRESH, stride_km, stride_vm, stride_pr, pos_x0, half_alpha,
    log2_to_bucket, num_buckets,
    DQ: tl.constexpr, DV: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TARGETS: tl.constexpr,
    SILU_MODE: tl.constexpr, DOT_PREC: tl.constexpr, TIME_STEPS: tl.constexpr,
):
    cols = start_n + offs_n
    cols_ok = cols < seq_len
    k = _load_tile(k_base + cols[:, None] * stride_km + offs_dq[None, :], cols_ok, offs_dq < DQ,
                   MASKED, DQ != BLOCK_DQ)
    h = _mma(q, tl.trans(k), None, DOT_PREC) * half_alpha
    if HAS_BIAS:
        # Columns past the end read the last key's timestamp: the tile's gap range stays that of
        # its real keys (their results are discarded).
        ts_k = tl.load(TS_base + tl.minimum(cols, seq_len - 1))
        gap_lo, gap_hi = _gap_range(q_ts_lo, q_ts_hi, ts_k)
        tb, _, _ = _time_bias(TIME_W, THRESH, tl.abs(ts_q[:, None] - ts_k[None, :]), gap_lo, gap_hi,
                              log2_to_bucket, num_buckets, SILU_MODE != 0, TIME_STEPS)
        pb = _pos_bias(POS_ROWS, stride_pr, offs_r[:, None], offs_n[None, :], start_n - start_m + pos_x0)
        h += 0.5 * (pb + tb)
    p = _silu_of_half(h, SILU_MODE)
    if MASKED:
        p = tl.where(_allowed(offs_m[:, None], cols[None, :], hist, HAS_TARGETS), p, 0.0)
    v = _load_tile(v_base + cols[:, None] * stride_vm + offs_dv[None, :], cols_ok, offs_dv < DV,
                   MASKED, DV != BLOCK_DV)
    return _mma(p.to(v.dtype), v, acc, DOT_PREC)


@triton.jit(do_not_specialize=_PER_BATCH)
def _hstu_fwd_kernel(
    Q, K, V, OUT, SEQ_OFFSETS, NUM_TARGETS, POS_ROWS, TIME_W, TS, THRESH,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_om, stride_oh, stride_pr, pos_x0,
    H, alpha, inv_max_seq_len, max_seq_len, log2_to_bucket, num_buckets,
    AUTOTUNE_LEN,  # autotuning key only: the batch's longest sequence, rounded up to a power of 2
    MAX_LEN,  # the batch's longest sequence: the grid has cdiv(MAX_LEN, BLOCK) programs per (sequence, head)
    DQ: tl.constexpr, DV: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_TARGETS: tl.constexpr, SILU_MODE: tl.constexpr, DOT_PREC: tl.constexpr,
    TIME_STEPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOOP_STAGES: tl.constexpr = None,
):
    pid_bh, i = _program_tile(MAX_LEN, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    seq_start = tl.load(SEQ_OFFSETS + b)
    seq_len = (tl.load(SEQ_OFFSETS + b + 1) - seq_start).to(tl.int32)
    # Query blocks are counted from the end of the sequence: a pair's last (longest-row) blocks
    # start first, its cheap first blocks fill in behind them.
    m_block = tl.cdiv(seq_len, BLOCK_M) - 1 - i
    if m_block < 0:
        return
    start_m = m_block * BLOCK_M
    hist = seq_len
    if HAS_TARGETS:
        hist = tl.minimum(tl.maximum(seq_len - tl.load(NUM_TARGETS + b).to(tl.int32), 0), seq_len)

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_r
    offs_n = tl.arange(0, BLOCK_N)
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_ok = offs_m < seq_len
    q_base = Q + seq_start * stride_qm + h * stride_qh
    k_base = K + seq_start * stride_km + h * stride_kh
    v_base = V + seq_start * stride_vm + h * stride_vh
    TS_base = TS + seq_start
    q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_dq[None, :], rows_ok, offs_dq < DQ,
                   True, DQ != BLOCK_DQ)
    ts_q = offs_m  # placeholders when there is no bias (never read)
    q_ts_lo = 0
    q_ts_hi = 0
    if HAS_BIAS:
        ts_q = tl.load(TS_base + tl.minimum(offs_m, seq_len - 1))  # rows past the end: the last row's
        q_ts_lo = tl.min(ts_q, axis=0)
        q_ts_hi = tl.max(ts_q, axis=0)
    half_alpha = 0.5 * alpha
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    full_end, a_end, b_start, hi = _key_ranges(start_m, seq_len, hist, BLOCK_M, BLOCK_N, HAS_TARGETS)
    for start_n in tl.range(0, full_end, BLOCK_N, num_stages=LOOP_STAGES):
        acc = _fwd_tile(acc, q, k_base, v_base, start_m, start_n, offs_m, offs_r, offs_n, offs_dq, offs_dv, seq_len,
                        hist, ts_q, q_ts_lo, q_ts_hi, TS_base, POS_ROWS, TIME_W, THRESH, stride_km, stride_vm,
                        stride_pr, pos_x0, half_alpha, log2_to_bucket, num_buckets, DQ, DV, BLOCK_DQ, BLOCK_DV,
                        False, HAS_BIAS, HAS_TARGETS, SILU_MODE, DOT_PREC, TIME_STEPS)
    for start_n in tl.range(full_end, a_end, BLOCK_N, num_stages=LOOP_STAGES):
        acc = _fwd_tile(acc, q, k_base, v_base, start_m, start_n, offs_m, offs_r, offs_n, offs_dq, offs_dv, seq_len,
                        hist, ts_q, q_ts_lo, q_ts_hi, TS_base, POS_ROWS, TIME_W, THRESH, stride_km, stride_vm,
                        stride_pr, pos_x0, half_alpha, log2_to_bucket, num_buckets, DQ, DV, BLOCK_DQ, BLOCK_DV,
                        True, HAS_BIAS, HAS_TARGETS, SILU_MODE, DOT_PREC, TIME_STEPS)
    if HAS_TARGETS:
        for start_n in tl.range(b_start, hi, BLOCK_N, num_stages=LOOP_STAGES):
            acc = _fwd_tile(acc, q, k_base, v_base, start_m, start_n, offs_m, offs_r, offs_n, offs_dq, offs_dv,
                            seq_len, hist, ts_q, q_ts_lo, q_ts_hi, TS_base, POS_ROWS, TIME_W, THRESH, stride_km,
                            stride_vm, stride_pr, pos_x0, half_alpha, log2_to_bucket, num_buckets, DQ, DV, BLOCK_DQ,
                            BLOCK_DV, True, HAS_BIAS, HAS_TARGETS, SILU_MODE, DOT_PREC, TIME_STEPS)

    acc = acc * inv_max_seq_len
    o_ptrs = OUT + seq_start * stride_om + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=rows_ok[:, None] & (offs_dv < DV)[None, :])


# ----------------------------------------------------------------------------------------------
# Backward: dK, dV and the bias-table gradients (one program per key block)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dkdv_tile(
    dk, dv, t_hist, k, v, q_base, do_base, start_m, start_n, offs_m, offs_n, offs_dq, offs_dv, seq_len, hist,
    ts_k, k_ts_lo, k_ts_hi, TS_base, POS_ROWS, TIME_W, THRESH, DPOS, stride_qm, stride_dom, stride_pr, pos_x0,
    half_alpha, inv_max_seq_len, max_seq_len, log2_to_bucket, num_buckets,
    DQ: tl.constexpr, DV: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIAG: tl.constexpr, NUM_BINS: tl.constexpr,
    MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, HAS_TARGETS: tl.constexpr,
    SILU_MODE: tl.constexpr, DOT_PREC: tl.constexpr, TIME_STEPS: tl.constexpr,
):
    # The tile is transposed (keys are rows) so that dK and dV accumulate along its rows.
    rows_q = start_m + offs_m
    q_ok = rows_q < seq_len
    q = _load_tile(q_base + rows_q[:, None] * stride_qm + offs_dq[None, :], q_ok, offs_dq < DQ,
                   True, DQ != BLOCK_DQ)
    do = _load_tile(do_base + rows_q[:, None] * stride_dom + offs_dv[None, :], q_ok, offs_dv < DV,
                    True, DV != BLOCK_DV)
    cols_k = start_n + offs_n  # key positions: rows of the transposed tile
    hT = _mma(k, tl.trans(q), None, DOT_PREC) * half_alpha
    if HAS_BIAS:
        ts_q = tl.load(TS_base + tl.minimum(rows_q, seq_len - 1))  # rows past the end: the last row's
        gap_lo, gap_hi = _gap_range(k_ts_lo, k_ts_hi, ts_q)
        dtT = tl.abs(ts_q[None, :] - ts_k[:, None])
        tbT, b_lo, b_hi = _time_bias(TIME_W, THRESH, dtT, gap_lo, gap_hi, log2_to_bucket, num_buckets,
                                     SILU_MODE != 0, TIME_STEPS)
        pbT = _pos_bias(POS_ROWS, stride_pr, offs_m[None, :], offs_n[:, None], start_n - start_m + pos_x0)
        hT += 0.5 * (pbT + tbT)
    pT, dsiluT = _silu_and_grad_of_half(hT, SILU_MODE)
    if MASKED:
        okT = _allowed(rows_q[None, :], cols_k[:, None], hist, HAS_TARGETS)
        pT = tl.where(okT, pT, 0.0)
        dsiluT = tl.where(okT, dsiluT, 0.0)
    dv = _mma(pT.to(do.dtype), do, dv, DOT_PREC)
    dpT = _mma(v, tl.trans(do), None, DOT_PREC)
    dsT = dpT * dsiluT  # dL/ds * max_seq_len; rows past the end have do = 0 so dsT = 0 there
    dk = _mma(dsT.to(q.dtype), q, dk, DOT_PREC)
    if BIAS_GRAD:
        dbT = dsT * inv_max_seq_len  # dL/dbias(i, j), summed into the two tables below
        # Position table: bias(i, j) uses pos_weights[N-1 + j - i], constant along the tile's
        # diagonals.  Gather each diagonal into a row (w = c - r + BLOCK_M - 1) and reduce it:
        # one atomic per relative position per tile instead of one per element.
        # Gathering along the key axis makes the gathered tile [DIAG, BLOCK_M], not [BLOCK_N, DIAG].
        w = tl.arange(0, DIAG)
        c_idx = w[:, None] + offs_m[None, :] - (BLOCK_M - 1)
        on_diag = (c_idx >= 0) & (c_idx < BLOCK_N)
        g = tl.gather(dbT, tl.where(on_diag, c_idx, 0), axis=0)
        diag_sum = tl.sum(tl.where(on_diag, g, 0.0), axis=1)
        pos = (max_seq_len - 1) + start_n - start_m + w - (BLOCK_M - 1)
        tl.atomic_add(DPOS + pos, diag_sum, sem="relaxed",
                      mask=(w < BLOCK_M + BLOCK_N - 1) & (pos >= 0) & (pos < 2 * max_seq_len - 1))
        # Time table: every real element's bucket lies in the tile's [b_lo, b_hi] (a narrow range
        # away from the diagonal), so reduce the tile once per bucket of that range, by comparisons
        # against its two thresholds (the lower one is "any gap" for b_lo, whose bucket includes
        # gaps of 0 below THRESH[0]), into a per-program histogram.
        valid = q_ok[None, :] & (cols_k < seq_len)[:, None]
        if MASKED:
            valid = valid & okT
        dbT = tl.where(valid, dbT, 0.0)
        bins = tl.arange(0, NUM_BINS)
        for bb in range(b_lo, b_hi + 1):
            lower = tl.where(bb == b_lo, 0, tl.load(THRESH + bb))
            upper = tl.load(THRESH + bb + 1)
            part = tl.sum(tl.where((dtT >= lower) & (dtT < upper), dbT, 0.0), axis=None)
            t_hist += tl.where(bins == bb, part, 0.0)
    return dk, dv, t_hist


@triton.jit(do_not_specialize=_PER_BATCH)
def _hstu_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, SEQ_OFFSETS, NUM_TARGETS, POS_ROWS, TIME_W, TS, THRESH, DPOS, DTIME,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_dom, stride_doh,
    stride_dkm, stride_dkh, stride_dvm, stride_dvh, stride_pr, pos_x0,
    H, alpha, inv_max_seq_len, max_seq_len, log2_to_bucket, num_buckets,
    AUTOTUNE_LEN, MAX_LEN,
    DQ: tl.constexpr, DV_: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
    NUM_BINS: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, HAS_TARGETS: tl.constexpr,
    SILU_MODE: tl.constexpr, DOT_PREC: tl.constexpr, TIME_STEPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIAG: tl.constexpr,
):
    pid_bh, i = _program_tile(MAX_LEN, BLOCK_N)
    b = pid_bh // H
    h = pid_bh % H
    seq_start = tl.load(SEQ_OFFSETS + b)
    seq_len = (tl.load(SEQ_OFFSETS + b + 1) - seq_start).to(tl.int32)
    # Key block 0 is seen by every query: the heaviest programs come first.
    start_n = i * BLOCK_N
    if start_n >= seq_len:
        return
    hist = seq_len
    if HAS_TARGETS:
        hist = tl.minimum(tl.maximum(seq_len - tl.load(NUM_TARGETS + b).to(tl.int32), 0), seq_len)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols_k = start_n + offs_n
    k_ok = cols_k < seq_len
    q_base = Q + seq_start * stride_qm + h * stride_qh
    do_base = DO + seq_start * stride_dom + h * stride_doh
    TS_base = TS + seq_start
    k = _load_tile(K + seq_start * stride_km + h * stride_kh + cols_k[:, None] * stride_km + offs_dq[None, :],
                   k_ok, offs_dq < DQ, True, DQ != BLOCK_DQ)
    v = _load_tile(V + seq_start * stride_vm + h * stride_vh + cols_k[:, None] * stride_vm + offs_dv[None, :],
                   k_ok, offs_dv < DV_, True, DV_ != BLOCK_DV)
    ts_k = offs_n  # placeholders when there is no bias (never read)
    k_ts_lo = 0
    k_ts_hi = 0
    if HAS_BIAS:
        ts_k = tl.load(TS_base + tl.minimum(cols_k, seq_len - 1))  # keys past the end: the last key's
        k_ts_lo = tl.min(ts_k, axis=0)
        k_ts_hi = tl.max(ts_k, axis=0)
    half_alpha = 0.5 * alpha
    dk = tl.zeros([BLOCK_N, BLOCK_DQ], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    t_hist = tl.zeros([NUM_BINS], dtype=tl.float32)

    # Query blocks that see this key block: from the one holding the diagonal to the end; those
    # starting at/after start_n + BLOCK_N - 1 see every key of the block (no element mask), unless
    # the block holds target keys, which only their own row sees.
    lo = (start_n // BLOCK_M) * BLOCK_M
    m_full = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    masked_hi = tl.minimum(m_full, seq_len)
    unmasked_lo = m_full
    if HAS_TARGETS:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if start_n + BLOCK_N > hist:
            unmasked_lo = seq_len
            masked_hi = seq_len
            if start_n >= hist:
                masked_hi = tl.minimum(start_n + BLOCK_N, seq_len)
    for start_m in range(lo, masked_hi, BLOCK_M):
        dk, dv, t_hist = _dkdv_tile(
            dk, dv, t_hist, k, v, q_base, do_base, start_m, start_n, offs_m, offs_n, offs_dq, offs_dv, seq_len,
            hist, ts_k, k_ts_lo, k_ts_hi, TS_base, POS_ROWS, TIME_W, THRESH, DPOS, stride_qm, stride_dom, stride_pr,
            pos_x0, half_alpha, inv_max_seq_len, max_seq_len, log2_to_bucket, num_buckets, DQ, DV_, BLOCK_DQ,
            BLOCK_DV, BLOCK_M, BLOCK_N, DIAG, NUM_BINS, True, HAS_BIAS, BIAS_GRAD, HAS_TARGETS, SILU_MODE, DOT_PREC,
            TIME_STEPS)
    for start_m in range(unmasked_lo, seq_len, BLOCK_M):
        dk, dv, t_hist = _dkdv_tile(
            dk, dv, t_hist, k, v, q_base, do_base, start_m, start_n, offs_m, offs_n, offs_dq, offs_dv, seq_len,
            hist, ts_k, k_ts_lo, k_ts_hi, TS_base, POS_ROWS, TIME_W, THRESH, DPOS, stride_qm, stride_dom, stride_pr,
            pos_x0, half_alpha, inv_max_seq_len, max_seq_len, log2_to_bucket, num_buckets, DQ, DV_, BLOCK_DQ,
            BLOCK_DV, BLOCK_M, BLOCK_N, DIAG, NUM_BINS, False, HAS_BIAS, BIAS_GRAD, HAS_TARGETS, SILU_MODE, DOT_PREC,
            TIME_STEPS)

    if BIAS_GRAD:
        bins = tl.arange(0, NUM_BINS)
        tl.atomic_add(DTIME + bins, t_hist, sem="relaxed", mask=(bins <= num_buckets) & (t_hist != 0.0))
    dk = dk * (2.0 * half_alpha * inv_max_seq_len)
    dv = dv * inv_max_seq_len
    dk_ptrs = DK + seq_start * stride_dkm + h * stride_dkh + cols_k[:, None] * stride_dkm + offs_dq[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=k_ok[:, None] & (offs_dq < DQ)[None, :])
    dv_ptrs = DV + seq_start * stride_dvm + h * stride_dvh + cols_k[:, None] * stride_dvm + offs_dv[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=k_ok[:, None] & (offs_dv < DV_)[None, :])


# ----------------------------------------------------------------------------------------------
# Backward: dQ (one program per query block)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dq_tile(
    dq, q, do, k_base, v_base, start_m, start_n, offs_m, offs_r, offs_n, offs_dq, offs_dv, seq_len, hist, ts_q,
    q_ts_lo, q_ts_hi, TS_base, POS_ROWS, TIME_W, THRESH, stride_km, stride_vm, stride_pr, pos_x0, half_alpha,
    log2_to_bucket, num_buckets,
    DQ: tl.constexpr, DV: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TARGETS: tl.constexpr,
    SILU_MODE: tl.constexpr, DOT_PREC: tl.constexpr, TIME_STEPS: tl.constexpr,
):
    cols = start_n + offs_n
    cols_ok = cols < seq_len
    k = _load_tile(k_base + cols[:, None] * stride_km + offs_dq[None, :], cols_ok, offs_dq < DQ,
                   MASKED, DQ != BLOCK_DQ)
    v = _load_tile(v_base + cols[:, None] * stride_vm + offs_dv[None, :], cols_ok, offs_dv < DV,
                   MASKED, DV != BLOCK_DV)
    h = _mma(q, tl.trans(k), None, DOT_PREC) * half_alpha
    if HAS_BIAS:
        ts_k = tl.load(TS_base + tl.minimum(cols, seq_len - 1))
        gap_lo, gap_hi = _gap_range(q_ts_lo, q_ts_hi, ts_k)
        tb, _, _ = _time_bias(TIME_W, THRESH, tl.abs(ts_q[:, None] - ts_k[None, :]), gap_lo, gap_hi,
                              log2_to_bucket, num_buckets, SILU_MODE != 0, TIME_STEPS)
        pb = _pos_bias(POS_ROWS, stride_pr, offs_r[:, None], offs_n[None, :], start_n - start_m + pos_x0)
        h += 0.5 * (pb + tb)
    dsilu = _silu_grad_of_half(h, SILU_MODE)
    if MASKED:
        dsilu = tl.where(_allowed(offs_m[:, None], cols[None, :], hist, HAS_TARGETS), dsilu, 0.0)
    dp = _mma(do, tl.trans(v), None, DOT_PREC)
    ds = dp * dsilu
    return _mma(ds.to(k.dtype), k, dq, DOT_PREC)


@triton.jit(do_not_specialize=_PER_BATCH)
def _hstu_bwd_dq_kernel(
    Q, K, V, DO, DQ_OUT, SEQ_OFFSETS, NUM_TARGETS, POS_ROWS, TIME_W, TS, THRESH,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_dom, stride_doh,
    stride_dqm, stride_dqh, stride_pr, pos_x0,
    H, alpha, inv_max_seq_len, max_seq_len, log2_to_bucket, num_buckets,
    AUTOTUNE_LEN, MAX_LEN,
    DQ: tl.constexpr, DV: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_TARGETS: tl.constexpr, SILU_MODE: tl.constexpr, DOT_PREC: tl.constexpr,
    TIME_STEPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOOP_STAGES: tl.constexpr = None,
):
    pid_bh, i = _program_tile(MAX_LEN, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    seq_start = tl.load(SEQ_OFFSETS + b)
    seq_len = (tl.load(SEQ_OFFSETS + b + 1) - seq_start).to(tl.int32)
    m_block = tl.cdiv(seq_len, BLOCK_M) - 1 - i
    if m_block < 0:
        return
    start_m = m_block * BLOCK_M
    hist = seq_len
    if HAS_TARGETS:
        hist = tl.minimum(tl.maximum(seq_len - tl.load(NUM_TARGETS + b).to(tl.int32), 0), seq_len)

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_r
    offs_n = tl.arange(0, BLOCK_N)
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_ok = offs_m < seq_len
    k_base = K + seq_start * stride_km + h * stride_kh
    v_base = V + seq_start * stride_vm + h * stride_vh
    TS_base = TS + seq_start
    q = _load_tile(Q + seq_start * stride_qm + h * stride_qh + offs_m[:, None] * stride_qm + offs_dq[None, :],
                   rows_ok, offs_dq < DQ, True, DQ != BLOCK_DQ)
    do = _load_tile(DO + seq_start * stride_dom + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :],
                    rows_ok, offs_dv < DV, True, DV != BLOCK_DV)
    ts_q = offs_m  # placeholders when there is no bias (never read)
    q_ts_lo = 0
    q_ts_hi = 0
    if HAS_BIAS:
        ts_q = tl.load(TS_base + tl.minimum(offs_m, seq_len - 1))
        q_ts_lo = tl.min(ts_q, axis=0)
        q_ts_hi = tl.max(ts_q, axis=0)
    half_alpha = 0.5 * alpha
    dq = tl.zeros([BLOCK_M, BLOCK_DQ], dtype=tl.float32)

    full_end, a_end, b_start, hi = _key_ranges(start_m, seq_len, hist, BLOCK_M, BLOCK_N, HAS_TARGETS)
    for start_n in tl.range(0, full_end, BLOCK_N, num_stages=LOOP_STAGES):
        dq = _dq_tile(dq, q, do, k_base, v_base, start_m, start_n, offs_m, offs_r, offs_n, offs_dq, offs_dv, seq_len,
                      hist, ts_q, q_ts_lo, q_ts_hi, TS_base, POS_ROWS, TIME_W, THRESH, stride_km, stride_vm,
                      stride_pr, pos_x0, half_alpha, log2_to_bucket, num_buckets, DQ, DV, BLOCK_DQ, BLOCK_DV,
                      False, HAS_BIAS, HAS_TARGETS, SILU_MODE, DOT_PREC, TIME_STEPS)
    for start_n in tl.range(full_end, a_end, BLOCK_N, num_stages=LOOP_STAGES):
        dq = _dq_tile(dq, q, do, k_base, v_base, start_m, start_n, offs_m, offs_r, offs_n, offs_dq, offs_dv, seq_len,
                      hist, ts_q, q_ts_lo, q_ts_hi, TS_base, POS_ROWS, TIME_W, THRESH, stride_km, stride_vm,
                      stride_pr, pos_x0, half_alpha, log2_to_bucket, num_buckets, DQ, DV, BLOCK_DQ, BLOCK_DV,
                      True, HAS_BIAS, HAS_TARGETS, SILU_MODE, DOT_PREC, TIME_STEPS)
    if HAS_TARGETS:
        for start_n in tl.range(b_start, hi, BLOCK_N, num_stages=LOOP_STAGES):
            dq = _dq_tile(dq, q, do, k_base, v_base, start_m, start_n, offs_m, offs_r, offs_n, offs_dq, offs_dv,
                          seq_len, hist, ts_q, q_ts_lo, q_ts_hi, TS_base, POS_ROWS, TIME_W, THRESH, stride_km,
                          stride_vm, stride_pr, pos_x0, half_alpha, log2_to_bucket, num_buckets, DQ, DV, BLOCK_DQ,
                          BLOCK_DV, True, HAS_BIAS, HAS_TARGETS, SILU_MODE, DOT_PREC, TIME_STEPS)

    dq = dq * (alpha * inv_max_seq_len)
    dq_ptrs = DQ_OUT + seq_start * stride_dqm + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_dq[None, :]
    tl.store(dq_ptrs, dq.to(DQ_OUT.dtype.element_ty), mask=rows_ok[:, None] & (offs_dq < DQ)[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------

def tile_config(block_m: int, block_n: int, num_warps: int, num_stages: int, diag: bool = False,
                maxnreg: int | None = None, loop_stages: int | None = None) -> triton.Config:
    """A launch configuration of one kernel: its tile (query rows x key rows), warps, pipeline
    stages, optional register cap, and the fwd / dQ key loops' own pipelining (None: num_stages).

    ``diag`` adds the width of the dK/dV kernel's diagonal gather; ``kernel_configs`` adds it itself
    to a dK/dV configuration that lacks it.

    >>> tile_config(64, 32, 4, 3).kwargs
    {'BLOCK_M': 64, 'BLOCK_N': 32}
    """
    kwargs = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    if diag:
        kwargs["DIAG"] = _diag(block_m, block_n)
    if loop_stages is not None:
        kwargs["LOOP_STAGES"] = loop_stages
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)


def _diag(block_m: int, block_n: int) -> int:
    return triton.next_power_of_2(block_m + block_n - 1)


_cfg = tile_config  # short name for the candidate tables below

# Under TRITON_INTERPRET=1 one small configuration, no autotuning (each interpreted op costs the
# same whatever the tile size, so small tiles keep masks and multi-block loops exercised cheaply).
# BLOCK_M != BLOCK_N on purpose: the loop-bound arithmetic must not rely on square tiles.
_INTERPRETER_CONFIGS = {
    "fwd": triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}),
    "dkdv": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}),
    "dq": triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}),
}


# Hopper (H100/H200) candidates, per kernel and per variant, chosen from the compiler's register
# report for D = 128 (sm_90, bf16): every "plain" config compiles without (or with a few bytes of)
# spills.  Within one program the tensor-core work and the SiLU's special-function work of a tile
# run one after the other (both warpgroups wait at the same barriers), so configs that fit two
# programs on an SM (4 warps, or 8 warps capped at 128 registers) let one program's matmuls
# overlap the other's tanh.  The in-kernel bias costs registers (the position tile, the time
# buckets' arithmetic and lookups, and in dK/dV the diagonal gather of dS), so the bias variants use
# narrower tiles, and at most two candidates each to bound autotuning compile time.  Their forward
# and dQ loops are not software-pipelined (loop_stages=1): pipelined, the time bias's per-tile scalar
# work and lookups made the forward 2x slower at N=4096 (24.2 against 12.1 ms on an H200, and 4x
# before the position tile; `docs/benchmarks.md`).  Head dims
# above 128 double the tiles' shared memory and registers; their candidates are the small ones.
_CONFIGS = {
    "fwd": {
        "plain": [_cfg(128, 32, 8, 4, maxnreg=128), _cfg(128, 32, 8, 3, maxnreg=128), _cfg(128, 64, 8, 3),
                  _cfg(64, 64, 4, 2), _cfg(64, 32, 4, 3)],
        "bias": [_cfg(64, 64, 4, 2, loop_stages=1), _cfg(128, 64, 8, 2, loop_stages=1)],
        "big_d": [_cfg(64, 32, 4, 3), _cfg(64, 64, 4, 2), _cfg(128, 32, 8, 2)],
    },
    "dq": {
        "plain": [_cfg(128, 32, 8, 3, maxnreg=128), _cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3), _cfg(64, 32, 4, 3)],
        "bias": [_cfg(64, 64, 4, 2, loop_stages=1), _cfg(64, 32, 4, 3, loop_stages=1)],
        "big_d": [_cfg(64, 32, 4, 3), _cfg(64, 16, 4, 2), _cfg(128, 32, 8, 2)],
    },
    "dkdv": {
        "plain": [_cfg(64, 128, 8, 3, True), _cfg(32, 128, 8, 3, True), _cfg(32, 64, 4, 3, True),
                  _cfg(16, 64, 4, 2, True)],
        "bias": [_cfg(32, 128, 8, 3, True), _cfg(16, 128, 8, 3, True)],
        "bias_grad": [_cfg(32, 64, 4, 2, True), _cfg(16, 64, 4, 3, True)],
        "big_d": [_cfg(32, 64, 4, 3, True), _cfg(16, 64, 4, 2, True), _cfg(32, 128, 8, 2, True)],
    },
}
# Used when autotuning is switched off (HSTU_ATTN_AUTOTUNE=0): the first candidate of the variant.
# The "plain" lists start with the fastest config at N=4096 of a one-config-at-a-time sweep on an H200
# (`python -m benchmarks.kernel_configs`, docs/benchmarks.md); the slowest of that sweep were dropped.


def _variant(which: str, kw: dict) -> str:
    if max(kw["BLOCK_DQ"], kw["BLOCK_DV"]) > 128:
        return "big_d"
    if which == "dkdv" and kw.get("BIAS_GRAD"):
        return "bias_grad"
    return "bias" if kw["HAS_BIAS"] else "plain"


def _all_configs(which: str) -> list[triton.Config]:
    seen, out = set(), []
    for cfgs in _CONFIGS[which].values():
        for c in cfgs:
            if str(c) not in seen:
                seen.add(str(c))
                out.append(c)
    return out


def _pruner(which: str):
    def prune(configs, named_args, **kwargs):
        wanted = {str(c) for c in _CONFIGS[which][_variant(which, {**named_args, **kwargs})]}
        return [c for c in configs if str(c) in wanted]

    return prune


_KEYS = ["AUTOTUNE_LEN", "BLOCK_DQ", "BLOCK_DV", "HAS_BIAS", "HAS_TARGETS", "SILU_MODE", "DOT_PREC", "TIME_STEPS"]


@functools.cache
def _tuned(which: str):
    prune = {"early_config_prune": _pruner(which)}
    if which == "fwd":
        return triton.autotune(_all_configs(which), key=_KEYS, prune_configs_by=prune)(_hstu_fwd_kernel)
    if which == "dq":
        return triton.autotune(_all_configs(which), key=_KEYS, prune_configs_by=prune)(_hstu_bwd_dq_kernel)
    # Autotuning runs the kernel repeatedly: the atomically accumulated bias gradients must be
    # zeroed before each trial (and after the last one).
    return triton.autotune(_all_configs(which), key=_KEYS + ["BIAS_GRAD"], reset_to_zero=["DPOS", "DTIME"],
                           prune_configs_by=prune)(_hstu_bwd_dkdv_kernel)


def _launch(which: str, kernel, grid_rows, bh: int, args: tuple, meta: dict) -> None:
    """Launch ``kernel`` with a fixed config (pinned by ``kernel_configs``, the interpreter's, or
    the first candidate when autotuning is off) or through its autotuner."""
    cfg = _PINNED.get(which)
    if cfg is None and _INTERPRET:
        cfg = _INTERPRETER_CONFIGS[which]
    if cfg is None and os.environ.get("HSTU_ATTN_AUTOTUNE", "1") == "0":
        cfg = _CONFIGS[which][_variant(which, meta)][0]
    if cfg is None:
        tuned = _tuned(which)
        tuned[lambda m: (bh * triton.cdiv(grid_rows, m[_GRID_BLOCK[which]]),)](*args, **meta)
        return
    blocks = dict(cfg.kwargs)
    if meta["HAS_BIAS"] and blocks["BLOCK_M"] > _POS_ROWS:
        raise ValueError(f"BLOCK_M={blocks['BLOCK_M']} with the relative bias: at most {_POS_ROWS} query rows a tile")
    if which == "dkdv" and "DIAG" not in blocks:
        blocks["DIAG"] = _diag(blocks["BLOCK_M"], blocks["BLOCK_N"])
    # The interpreter runs no compiler: warps, stages and register caps mean nothing to it.
    launch = blocks if _INTERPRET else {**cfg.all_kwargs(), **blocks}
    kernel[(bh * triton.cdiv(grid_rows, blocks[_GRID_BLOCK[which]]),)](*args, **meta, **launch)


_PINNED: dict[str, triton.Config] = {}


@contextlib.contextmanager
def kernel_configs(*, fwd: triton.Config | None = None, dq: triton.Config | None = None,
                   dkdv: triton.Config | None = None) -> Iterator[None]:
    """Launch the given kernels with these configurations (``tile_config``) inside the ``with``
    block, for every variant (bias or not, any head dim), instead of autotuning or the
    interpreter's fixed tiles.

    For config sweeps (``benchmarks/kernel_configs.py``) and for tests of other tile shapes, so
    that neither edits the candidate lists.  A kernel left None keeps its usual choice; an inner
    block overrides an outer one, and the previous pins come back on exit, exception or not.

    >>> with kernel_configs(fwd=tile_config(16, 16, 4, 1)):
    ...     pass
    """
    global _PINNED
    pins = {"fwd": fwd, "dq": dq, "dkdv": dkdv}
    prev, _PINNED = _PINNED, {**_PINNED, **{w: c for w, c in pins.items() if c is not None}}
    try:
        yield
    finally:
        _PINNED = prev


# Each (sequence, head) pair gets cdiv(longest, block) programs: query blocks (fwd, dq) or key blocks (dkdv).
_GRID_BLOCK = {"fwd": "BLOCK_M", "dq": "BLOCK_M", "dkdv": "BLOCK_N"}


def chosen_configs() -> dict[str, str]:
    """The configuration each autotuner picked on its last run (for benchmark reports)."""
    out = {}
    if _tuned.cache_info().currsize:
        for which in ("fwd", "dq", "dkdv"):
            best = getattr(_tuned(which), "best_config", None)
            if best is not None:
                out[which] = str(best)
    return out


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

_POISON = False


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Test hook: allocate every kernel output (out, dq, dk, dv) NaN-filled instead of
    uninitialised, so an element the kernels fail to write shows up as NaN."""
    global _POISON
    prev, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = prev


def _new_output(shape, like: torch.Tensor, covered: bool) -> torch.Tensor:
    if not covered:  # rows outside every sequence are never visited by a program: define them as 0
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    if _POISON:
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


_INT32_MAX = 2**31 - 1

def _offsets_on_host(seq_offsets: torch.Tensor, L: int, device: torch.device):
    """(offsets on the host, lengths on the host, int64 offsets on ``device``), validated."""

    def compute():
        offs = seq_offsets.detach().to("cpu", torch.int64)
        if offs.dim() != 1 or offs.numel() < 1:
            raise ValueError("seq_offsets must be a 1-D tensor [B + 1]")
        lengths = offs[1:] - offs[:-1]
        if (lengths < 0).any() or offs[0] < 0 or offs[-1] > L:
            raise ValueError(f"seq_offsets must be non-decreasing within [0, {L}]; got {offs.tolist()[:8]}...")
        return offs, lengths, seq_offsets.detach().to(device=device, dtype=torch.int64).contiguous()

    return cached("offsets", (seq_offsets,), (L, str(device)), compute)


def _kernel_timestamps(ts: torch.Tensor, L: int, seq_offsets: torch.Tensor, offs: torch.Tensor, lengths: torch.Tensor,
                       scale: float, num_buckets: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Timestamps as the kernels read them, and the matching bucket-threshold table.

    Only differences within a sequence matter, so each sequence is shifted to start at its own
    minimum; when every sequence then spans less than 2^31 - 1 seconds the kernels get int32 (half
    the registers and integer work of int64 in the bias tile), else int64.
    """
    return cached("timestamps", (ts, seq_offsets), (L, scale, num_buckets, str(device)),
                   lambda: _kernel_timestamps_uncached(ts[:L].to(device=device, dtype=torch.int64), offs, lengths,
                                                       scale, num_buckets))


def _kernel_timestamps_uncached(ts, offs, lengths, scale, num_buckets):
    thresh = bucket_thresholds(scale, num_buckets)
    L = ts.numel()
    if L == 0:
        return ts, thresh.to(ts.device)
    seq_id = torch.repeat_interleave(torch.arange(lengths.numel()), lengths).to(ts.device)
    start = int(offs[0])
    seq_ts = ts[start:start + seq_id.numel()]
    mins = torch.full((lengths.numel(),), torch.iinfo(torch.int64).max, dtype=torch.int64, device=ts.device)
    mins = mins.scatter_reduce(0, seq_id, seq_ts, "amin")
    rel = ts.clone()
    rel[start:start + seq_id.numel()] = seq_ts - mins[seq_id]
    if seq_id.numel() and int(rel[start:start + seq_id.numel()].max()) < _INT32_MAX:
        # A threshold above every possible gap can never be reached: clamp instead of overflowing.
        return rel.to(torch.int32), thresh.clamp(max=_INT32_MAX).to(torch.int32).to(ts.device)
    return ts, thresh.to(ts.device)


def _dot_precision(dtype: torch.dtype) -> str:
    if _INTERPRET:
        return "upcast" if dtype == torch.bfloat16 else "ieee"
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit operands
    # fp32 follows PyTorch's global matmul setting, like the reference's matmuls do.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _silu_mode(dtype: torch.dtype) -> int:
    if _INTERPRET or dtype == torch.float32:
        return SILU_EXACT
    return _SILU_BY_NAME[os.environ.get("HSTU_ATTN_SILU", "tanh")]


class _Meta:
    """Everything the kernels need besides q, k, v (validated once in forward)."""

    def __init__(self, q, seq_offsets, max_seq_len, alpha, pos_w, time_w, ts, scale, num_targets):
        L, H, dq = q.shape
        offs, lengths, self.seq_offsets = _offsets_on_host(seq_offsets, L, q.device)
        self.longest = int(lengths.max()) if lengths.numel() else 0
        if self.longest > max_seq_len:
            raise ValueError(f"a sequence of length {self.longest} exceeds max_seq_len={max_seq_len}")
        self.covered = bool(offs[0] == 0 and offs[-1] == L)
        self.B, self.H, self.L = lengths.numel(), H, L
        self.max_seq_len, self.alpha = int(max_seq_len), float(alpha)
        self.has_targets = num_targets is not None
        if self.has_targets:
            if num_targets.numel() != self.B:
                raise ValueError(f"num_targets has {num_targets.numel()} entries for {self.B} sequences")
            self.num_targets = num_targets.to(device=q.device).contiguous()
        else:
            self.num_targets = self.seq_offsets  # never read
        self.has_bias = pos_w is not None
        if self.has_bias:
            if pos_w.numel() < 2 * max_seq_len - 1:
                raise ValueError(f"pos_weights has {pos_w.numel()} entries; max_seq_len={max_seq_len} needs "
                                 f"{2 * max_seq_len - 1}")
            if ts.numel() < L:
                raise ValueError(f"timestamps has {ts.numel()} entries for {L} tokens")
            self.num_buckets = time_w.numel() - 1
            self.scale = float(scale)
            self.ts, self.thresh = _kernel_timestamps(ts, L, seq_offsets, offs, lengths, self.scale, self.num_buckets,
                                                      q.device)
        else:
            self.num_buckets, self.scale = 0, 1.0
            self.ts = self.thresh = self.seq_offsets  # never read
        self.dot_prec = _dot_precision(q.dtype)
        self.silu_mode = _silu_mode(q.dtype)
        self.autotune_len = tuning_length(self.longest)

    def scalars(self) -> tuple:
        # The kernels take log2 and scale by ln(2) / scale to get ln(dt) / scale.
        return (self.H, self.alpha, 1.0 / self.max_seq_len, self.max_seq_len, math.log(2.0) / self.scale,
                self.num_buckets, self.autotune_len, self.longest)


# Rows of the position-bias matrix: at least the query rows of any tile (the largest candidate is 128).
_POS_ROWS = 128


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


@functools.cache
def _pos_row_index(max_seq_len: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(index into [pos_weights[:2N-1], 0] of every POS_ROWS element, x0); see ``_pos_rows``."""
    x0 = _round_up(max_seq_len + _POS_ROWS, 16)  # the largest query-block start past its key block, and more
    width = _round_up(x0 + max_seq_len + 2 * _POS_ROWS, 16)
    idx = (max_seq_len - 1 - x0) + torch.arange(width, device=device)[None, :] - \
        torch.arange(_POS_ROWS, device=device)[:, None]
    return torch.where((idx >= 0) & (idx < 2 * max_seq_len - 1), idx, 2 * max_seq_len - 1), x0


def _pos_rows(pos_w: torch.Tensor, max_seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """The position table laid out for tile loads: (POS_ROWS [128, W] in ``dtype``, x0).

    POS_ROWS[r, x] = pos_weights[max_seq_len - 1 + (x - x0) - r] (0 outside the table), so a tile
    whose key block starts d positions after its query block (d < 0 before it) reads element (r, c)
    at POS_ROWS[r, x0 + d + c]: one contiguous, 16-element aligned run per row instead of a gather
    per element (its rows shift by one place each, which a single copy of the table cannot align).
    1 MB at N=4096 in bf16, rebuilt per call (a gather of pos_weights, which changes every step).
    16-bit for 16-bit inputs: the bias is added to scores whose silu is rounded to 16 bits anyway.
    """
    idx, x0 = _pos_row_index(max_seq_len, pos_w.device)
    table = torch.cat([pos_w.detach()[: 2 * max_seq_len - 1], pos_w.new_zeros(1)]).to(dtype)
    return table[idx], x0


def time_steps() -> int:
    """The widest bucket range a tile evaluates by comparisons (``_time_bias``); env knob."""
    return int(os.environ.get("HSTU_ATTN_TIME_STEPS", "8"))


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _bias_args(meta: _Meta, pos_w, time_w, dtype) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(POS_ROWS, x0, time_weights) for the kernels; placeholders (never read) without a bias."""
    if not meta.has_bias:
        return meta.seq_offsets[None, :], 0, meta.seq_offsets
    rows, x0 = _pos_rows(pos_w, meta.max_seq_len, dtype)
    return rows, x0, time_w


def _forward(q, k, v, meta: _Meta, pos_w, time_w) -> torch.Tensor:
    L, H, dq = q.shape
    dv = v.shape[2]
    out = _new_output((L, H, dv), v, meta.covered)
    if meta.B == 0 or meta.longest == 0 or H == 0:
        return out
    rows, x0, tw = _bias_args(meta, pos_w, time_w, q.dtype)
    args = (q, k, v, out, meta.seq_offsets, meta.num_targets, rows, tw, meta.ts, meta.thresh,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), rows.stride(0), x0, *meta.scalars())
    kw = dict(DQ=dq, DV=dv, BLOCK_DQ=_block_d(dq), BLOCK_DV=_block_d(dv), HAS_BIAS=meta.has_bias,
              HAS_TARGETS=meta.has_targets, SILU_MODE=meta.silu_mode, DOT_PREC=meta.dot_prec,
              TIME_STEPS=time_steps())
    _launch("fwd", _hstu_fwd_kernel, meta.longest, meta.B * H, args, kw)
    return out


def _backward(q, k, v, do, meta: _Meta, pos_w, time_w, bias_grad: bool):
    L, H, dq_dim = q.shape
    dv_dim = v.shape[2]
    dq = _new_output(q.shape, q, meta.covered)
    dk = _new_output(k.shape, k, meta.covered)
    dv = _new_output(v.shape, v, meta.covered)
    dpos = dtime = None
    if bias_grad:
        dpos = torch.zeros(pos_w.numel(), dtype=torch.float32, device=q.device)
        dtime = torch.zeros(time_w.numel(), dtype=torch.float32, device=q.device)
    if meta.B == 0 or meta.longest == 0 or H == 0:
        return dq, dk, dv, dpos, dtime
    rows, x0, tw = _bias_args(meta, pos_w, time_w, q.dtype)
    common = dict(DQ=dq_dim, BLOCK_DQ=_block_d(dq_dim), BLOCK_DV=_block_d(dv_dim), HAS_BIAS=meta.has_bias,
                  HAS_TARGETS=meta.has_targets, SILU_MODE=meta.silu_mode, DOT_PREC=meta.dot_prec,
                  TIME_STEPS=time_steps())
    scratch = torch.zeros(1, dtype=torch.float32, device=q.device)
    args = (q, k, v, do, dk, dv, meta.seq_offsets, meta.num_targets, rows, tw, meta.ts, meta.thresh,
            dpos if bias_grad else scratch, dtime if bias_grad else scratch,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            rows.stride(0), x0, *meta.scalars())
    _launch("dkdv", _hstu_bwd_dkdv_kernel, meta.longest, meta.B * H, args,
            dict(common, DV_=dv_dim, NUM_BINS=triton.next_power_of_2(max(meta.num_buckets + 1, 2)),
                 BIAS_GRAD=bias_grad))
    args = (q, k, v, do, dq, meta.seq_offsets, meta.num_targets, rows, tw, meta.ts, meta.thresh,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), rows.stride(0), x0, *meta.scalars())
    _launch("dq", _hstu_bwd_dq_kernel, meta.longest, meta.B * H, args, dict(common, DV=dv_dim))
    return dq, dk, dv, dpos, dtime


class _HSTUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_w, time_w, meta: _Meta):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        out = _forward(q, k, v, meta, pos_w, time_w)
        ctx.save_for_backward(q, k, v, pos_w, time_w)
        ctx.meta = meta
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, pos_w, time_w = ctx.saved_tensors
        meta = ctx.meta
        bias_grad = meta.has_bias and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        dq, dk, dv, dpos, dtime = _backward(q, k, v, _last_dim_contiguous(do), meta, pos_w, time_w, bias_grad)
        if bias_grad:
            dpos = dpos.to(pos_w.dtype) if ctx.needs_input_grad[3] else None
            dtime = dtime.to(time_w.dtype) if ctx.needs_input_grad[4] else None
        return dq, dk, dv, dpos, dtime, None


def hstu_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    *,
    rab: RelativeBias | None = None,
    num_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton implementation of ``models.ops.hstu_attention`` (same arguments and result).

    Differentiable in q, k, v and, when a ``rab`` is given, in ``rab.pos_weights`` and
    ``rab.time_weights``.  Inputs bf16, fp16 or fp32 (fp32 accumulation); head dims up to 256
    (Dqk may differ from Dv).  Raises ValueError for a sequence longer than ``max_seq_len``.
    """
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"expected q, k [L, H, D] and v [L, H, Dv]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q, k, v must share one of fp32/bf16/fp16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if max(q.shape[2], v.shape[2]) > 256:
        raise ValueError(f"head dims up to 256 are supported; got Dqk={q.shape[2]}, Dv={v.shape[2]}")
    pos_w = time_w = ts = None
    scale = 1.0
    if rab is not None:
        pos_w, time_w, ts, scale = rab.pos_weights, rab.time_weights, rab.timestamps, rab.time_bucket_scale
    meta = _Meta(q, seq_offsets, max_seq_len, alpha, pos_w, time_w, ts, scale, num_targets)
    if rab is None:
        # autograd.Function needs tensors in the slots; empty placeholders carry no gradient.
        pos_w = time_w = q.new_empty(0)
    return _HSTUAttention.apply(q, k, v, pos_w, time_w, meta)
