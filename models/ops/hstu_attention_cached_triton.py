"""Triton kernel of ``models.ops.hstu_attention_cached``: new tokens against their cached prefix.

One program per (sequence, head, block of new tokens). It streams the sequence's cached keys and values
(rows ``starts[b] .. starts[b] + lengths[b]`` of the cache: no copy into a padded or concatenated
buffer, and sequences sharing a prefix read the same rows), then the new keys up to the diagonal, and
accumulates ``SiLU(alpha q k + bias) v`` as the full kernel does, with its device helpers (the relative
bias computed in place, the exact time buckets, the 16-bit SiLU). Cached keys are all visible, so only
the prefix's last block and the diagonal blocks evaluate a mask. Forward only (serving).

The grid depends on host bounds only (``max_new`` and the prefix's ``max_length`` when given), and the
kernel reads each sequence's lengths on the device: with both bounds the launch makes no device-to-host
copy, so a CUDA graph can hold it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from models.ops.hstu_attention_cached import CachedPrefix, _max
from models.ops.hstu_attention_triton import (
    _block_d,
    _dot_precision,
    _last_dim_contiguous,
    _load_tile,
    _mma,
    _new_output,
    _rel_bias,
    _silu_mode,
    _silu_of_half,
)
from models.ops.relative_bias import RelativeBias, thresholds_on


@triton.jit
def _cached_tile(
    acc, q, k_ptrs, v_ptrs, key_pos, keys_ok, visible, pos_q, ts_q, ts_k, POS_W, TIME_W, THRESH, half_alpha,
    max_seq_len, log2_to_bucket, num_buckets, DQ: tl.constexpr, DV: tl.constexpr, BLOCK_DQ: tl.constexpr,
    BLOCK_DV: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MODE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(k_ptrs, keys_ok, offs_dq < DQ, True, DQ != BLOCK_DQ)
    h = _mma(q, tl.trans(k), None, DOT_PREC) * half_alpha
    if HAS_BIAS:
        bias, _ = _rel_bias(POS_W, TIME_W, THRESH, pos_q[:, None], key_pos[None, :], ts_q[:, None], ts_k[None, :],
                            max_seq_len, log2_to_bucket, num_buckets, SILU_MODE != 0)
        h += 0.5 * bias
    p = tl.where(visible, _silu_of_half(h, SILU_MODE), 0.0)
    v = _load_tile(v_ptrs, keys_ok, offs_dv < DV, True, DV != BLOCK_DV)
    return _mma(p.to(v.dtype), v, acc, DOT_PREC)


@triton.jit
def _cached_fwd_kernel(
    Q, K, V, CK, CV, OUT, SEQ_OFFSETS, STARTS, LENGTHS, POS_W, TIME_W, TS, CTS, THRESH,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_ckm, stride_ckh, stride_cvm,
    stride_cvh, stride_om, stride_oh,
    H, alpha, inv_max_seq_len, max_seq_len, log2_to_bucket, num_buckets,
    DQ: tl.constexpr, DV: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU_MODE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    seq_start = tl.load(SEQ_OFFSETS + b)
    m = (tl.load(SEQ_OFFSETS + b + 1) - seq_start).to(tl.int32)
    start_m = tl.program_id(1) * BLOCK_M
    if start_m >= m:
        return
    cache_start = tl.load(STARTS + b)
    n = tl.load(LENGTHS + b).to(tl.int32)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_ok = offs_m < m
    rows = tl.minimum(offs_m, m - 1)  # rows past the end: any valid position, their results are dropped
    q = _load_tile(Q + (seq_start + offs_m)[:, None] * stride_qm + h * stride_qh + offs_dq[None, :], rows_ok,
                   offs_dq < DQ, True, DQ != BLOCK_DQ)
    pos_q = n + rows
    ts_q = rows  # placeholder when there is no bias (never read)
    if HAS_BIAS:
        ts_q = tl.load(TS + seq_start + rows)
    half_alpha = 0.5 * alpha
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # The cached prefix: every key visible to every new token.
    for start_n in tl.range(0, n, BLOCK_N):
        cols = start_n + offs_n
        cols_ok = cols < n
        key_pos = tl.minimum(cols, n - 1)
        cache_rows = cache_start + key_pos
        ts_k = key_pos
        if HAS_BIAS:
            ts_k = tl.load(CTS + cache_rows)
        acc = _cached_tile(acc, q, CK + cache_rows[:, None] * stride_ckm + h * stride_ckh + offs_dq[None, :],
                           CV + cache_rows[:, None] * stride_cvm + h * stride_cvh + offs_dv[None, :], key_pos,
                           cols_ok, cols_ok[None, :], pos_q, ts_q, ts_k, POS_W, TIME_W, THRESH, half_alpha,
                           max_seq_len, log2_to_bucket, num_buckets, DQ, DV, BLOCK_DQ, BLOCK_DV, HAS_BIAS,
                           SILU_MODE, DOT_PREC)
    # The new tokens, causal among themselves.
    for start_n in tl.range(0, tl.minimum(start_m + BLOCK_M, m), BLOCK_N):
        cols = start_n + offs_n
        cols_ok = cols < m
        new_cols = tl.minimum(cols, m - 1)
        ts_k = new_cols
        if HAS_BIAS:
            ts_k = tl.load(TS + seq_start + new_cols)
        visible = (cols[None, :] <= offs_m[:, None]) & cols_ok[None, :]
        acc = _cached_tile(acc, q, K + (seq_start + new_cols)[:, None] * stride_km + h * stride_kh + offs_dq[None, :],
                           V + (seq_start + new_cols)[:, None] * stride_vm + h * stride_vh + offs_dv[None, :],
                           n + new_cols, cols_ok, visible, pos_q, ts_q, ts_k, POS_W, TIME_W, THRESH, half_alpha,
                           max_seq_len, log2_to_bucket, num_buckets, DQ, DV, BLOCK_DQ, BLOCK_DV, HAS_BIAS,
                           SILU_MODE, DOT_PREC)

    acc = acc * inv_max_seq_len
    o_ptrs = OUT + (seq_start + offs_m)[:, None] * stride_om + h * stride_oh + offs_dv[None, :]
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=rows_ok[:, None] & (offs_dv < DV)[None, :])


def hstu_attention_cached_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    prefix: CachedPrefix,
    max_seq_len: int,
    alpha: float,
    *,
    rab: RelativeBias | None = None,
    max_new: int | None = None,
) -> torch.Tensor:
    """Triton implementation of ``models.ops.hstu_attention_cached`` (same arguments and result).

    Inputs bf16, fp16 or fp32, the prefix in the same dtype (fp32 accumulation); head dims up to 256.
    """
    if not (q.dtype == k.dtype == v.dtype == prefix.keys.dtype == prefix.values.dtype) or \
            q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q, k, v and the prefix must share one of fp32/bf16/fp16; got {q.dtype}, "
                         f"{prefix.keys.dtype}")
    if max(q.shape[2], v.shape[2]) > 256:
        raise ValueError(f"head dims up to 256 are supported; got Dqk={q.shape[2]}, Dv={v.shape[2]}")
    L, H, dq = q.shape
    dv = v.shape[2]
    batch = seq_offsets.numel() - 1
    if max_new is None:
        lengths = seq_offsets.diff()
        max_new = _max(lengths)
        if batch and int((prefix.lengths + lengths).max()) > max_seq_len:
            raise ValueError(f"a sequence of cached + new tokens exceeds max_seq_len={max_seq_len}")
    out = _new_output((L, H, dv), v, covered=True)
    if L == 0 or batch == 0 or max_new == 0:
        return out.zero_()
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    ck, cv = _last_dim_contiguous(prefix.keys), _last_dim_contiguous(prefix.values)
    offsets = seq_offsets.to(device=q.device, dtype=torch.int64)
    if rab is not None:
        scale, num_buckets = float(rab.time_bucket_scale), rab.num_time_buckets
        pos_w, time_w, thresh = rab.pos_weights, rab.time_weights, thresholds_on(scale, num_buckets, q.device)
        ts, cts = rab.timestamps.to(torch.int64), prefix.timestamps.to(torch.int64)
    else:
        scale, num_buckets = 1.0, 0
        pos_w = time_w = thresh = ts = cts = offsets  # never read
    # tl.dot needs 16 rows at least; a decode step has one new token per sequence, so M stays small.
    block_m, block_n = 16, (64 if q.device.type == "cuda" else 16)
    grid = (batch * H, triton.cdiv(max_new, block_m))
    starts, lengths = (t.to(q.device, torch.int64) for t in (prefix.starts, prefix.lengths))
    _cached_fwd_kernel[grid](
        q, k, v, ck, cv, out, offsets, starts, lengths, pos_w, time_w, ts, cts, thresh,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), ck.stride(0), ck.stride(1),
        cv.stride(0), cv.stride(1), out.stride(0), out.stride(1),
        H, float(alpha), 1.0 / max_seq_len, int(max_seq_len), math.log(2.0) / scale, num_buckets,
        DQ=dq, DV=dv, BLOCK_DQ=_block_d(dq), BLOCK_DV=_block_d(dv), HAS_BIAS=rab is not None,
        SILU_MODE=_silu_mode(q.dtype), DOT_PREC=_dot_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return out
