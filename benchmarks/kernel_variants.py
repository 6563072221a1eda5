"""Variants of the forward kernel's main loop, measured side by side (GPU; an experiment, not the op).

    python -m benchmarks.kernel_variants            # N=4096, H=4, d=128, bf16, ~512K tokens

A stripped copy of ``_hstu_fwd_kernel`` (no bias, no targets, power-of-two head dim) with switches
for the ideas tried on the way to the 450 TFLOP/s goal, each against the same batch and checked
against the op's output:

* ``pair-major``: the old launch order, (sequence, head) pair varying fastest, so each resident
  program streams a different pair's keys and values from HBM;
* ``block-major``: the op's order (``_program_tile``), a pair's blocks adjacent, sharing K/V in L2;
* ``tma``: K and V tiles loaded through host-side TMA descriptors instead of pointer loads;
* ``pipe``: QK^T of the next key block issued before the SiLU of the current one (hand-pipelined);
* ``prescale``: alpha/2 folded into q once instead of scaling every score;
* ``ws``: ``tl.range(warp_specialize=True)`` on the unmasked loop.

Only the launch order was adopted (docs/benchmarks.md says why the others were not).
"""

from __future__ import annotations

import argparse
import os

import torch
import triton
import triton.language as tl

from benchmarks.kernel import flops_fwd, make_batch
from models.ops import hstu_attention_triton as hat


@triton.jit
def _kv(K, V, KD, VD, row, col, k_base, v_base, cols, offs_d, stride_km, stride_vm, TMA: tl.constexpr):
    if TMA:
        k = KD.load([row.to(tl.int32), col])
        v = VD.load([row.to(tl.int32), col])
    else:
        k = tl.load(k_base + cols[:, None] * stride_km + offs_d[None, :])
        v = tl.load(v_base + cols[:, None] * stride_vm + offs_d[None, :])
    return k, v


@triton.jit
def _fwd_variant(
    Q, K, V, KD, VD, OUT, SEQ_OFFSETS, stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh,
    stride_om, stride_oh, H, alpha, inv_n,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PIPE: tl.constexpr, PRESCALE: tl.constexpr,
    WS: tl.constexpr, TMA: tl.constexpr, BLOCK_MAJOR: tl.constexpr, MAX_LEN,
):
    if BLOCK_MAJOR:
        pid_bh, pid_m = hat._program_tile(MAX_LEN, BLOCK_M)
    else:
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    seq_start = tl.load(SEQ_OFFSETS + b)
    seq_len = (tl.load(SEQ_OFFSETS + b + 1) - seq_start).to(tl.int32)
    m_block = tl.cdiv(seq_len, BLOCK_M) - 1 - pid_m
    if m_block < 0:
        return
    start_m = m_block * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    rows_ok = offs_m < seq_len
    q_base = Q + seq_start * stride_qm + h * stride_qh
    k_base = K + seq_start * stride_km + h * stride_kh
    v_base = V + seq_start * stride_vm + h * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=rows_ok[:, None], other=0.0)
    half_alpha = 0.5 * alpha
    if PRESCALE:
        q = (q.to(tl.float32) * half_alpha).to(q.dtype)
        sc = 1.0
    else:
        sc = half_alpha
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    full_end = (start_m // BLOCK_N) * BLOCK_N
    col = h * D
    if PIPE:
        if full_end > 0:
            k, v = _kv(K, V, KD, VD, seq_start, col, k_base, v_base, offs_n, offs_d, stride_km, stride_vm, TMA)
            s = tl.dot(q, tl.trans(k))
            for start_n in range(BLOCK_N, full_end, BLOCK_N):
                cols = start_n + offs_n
                k2, v2 = _kv(K, V, KD, VD, seq_start + start_n, col, k_base, v_base, cols, offs_d, stride_km,
                             stride_vm, TMA)
                s2 = tl.dot(q, tl.trans(k2))
                p = hat._silu_of_half(s * sc, 1)
                acc = tl.dot(p.to(v.dtype), v, acc)
                s = s2
                v = v2
            p = hat._silu_of_half(s * sc, 1)
            acc = tl.dot(p.to(v.dtype), v, acc)
    else:
        for start_n in tl.range(0, full_end, BLOCK_N, warp_specialize=WS):
            cols = start_n + offs_n
            k, v = _kv(K, V, KD, VD, seq_start + start_n, col, k_base, v_base, cols, offs_d, stride_km, stride_vm,
                       TMA)
            s = tl.dot(q, tl.trans(k)) * sc
            p = hat._silu_of_half(s, 1)
            acc = tl.dot(p.to(v.dtype), v, acc)
    hi = tl.minimum(start_m + BLOCK_M, seq_len)
    for start_n in range(full_end, hi, BLOCK_N):
        cols = start_n + offs_n
        cols_ok = cols < seq_len
        k = tl.load(k_base + cols[:, None] * stride_km + offs_d[None, :], mask=cols_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * sc
        p = hat._silu_of_half(s, 1)
        p = tl.where(cols[None, :] <= offs_m[:, None], p, 0.0)
        v = tl.load(v_base + cols[:, None] * stride_vm + offs_d[None, :], mask=cols_ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc)
    acc = acc * inv_n
    o_ptrs = OUT + seq_start * stride_om + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=rows_ok[:, None])



CONFIGS = [(128, 32, 8, 4, 128), (128, 32, 8, 3, 128), (128, 64, 8, 3, None), (128, 128, 8, 2, None),
           (64, 64, 4, 3, None)]
SWITCHES = [(), ("BLOCK_MAJOR",), ("BLOCK_MAJOR", "TMA"), ("BLOCK_MAJOR", "PIPE"), ("BLOCK_MAJOR", "PRESCALE"),
            ("BLOCK_MAJOR", "WS")]
NAMES = {"BLOCK_MAJOR": "block-major", "TMA": "tma", "PIPE": "pipe", "PRESCALE": "prescale", "WS": "ws"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    args = p.parse_args(argv)
    from triton.tools.tensor_descriptor import TensorDescriptor

    n = args.n
    b = make_batch(n, 512 * 1024, 4, 128, torch.bfloat16, False, 0)
    fl = flops_fwd(b["lengths"], 4, 128)
    q, k, v, offs = b["q"], b["k"], b["v"], b["offsets"]
    L, H, D = q.shape
    B = offs.numel() - 1
    os.environ["HSTU_ATTN_AUTOTUNE"] = "0"
    ref = hat.hstu_attention_triton(q, k, v, offs, n, b["alpha"])
    out = torch.empty_like(v)
    print(f"{torch.cuda.get_device_name()}  triton {triton.__version__}  N={n}  tokens={L}  "
          f"forward {fl / 1e12:.3f} TFLOP")
    print("| config (BLOCK_M x BLOCK_N, warps, stages, register cap) | variant | ms | TFLOP/s | rel. error vs op |")
    print("|---|---|--:|--:|--:|")
    for bm, bn, warps, stages, reg in CONFIGS:
        for on in SWITCHES if (bm, bn) == (128, 32) and reg == 128 and stages == 4 else SWITCHES[:2]:
            flags = {s: int(s in on) for s in NAMES}
            kd, vd = k, v
            if flags["TMA"]:
                kd = TensorDescriptor.from_tensor(k.view(L, H * D), [bn, D])
                vd = TensorDescriptor.from_tensor(v.view(L, H * D), [bn, D])
            blocks = triton.cdiv(n, bm)
            grid = (B * H * blocks,) if flags["BLOCK_MAJOR"] else (B * H, blocks)

            def run(kd=kd, vd=vd, grid=grid, flags=flags, bm=bm, bn=bn, warps=warps, stages=stages, reg=reg):
                _fwd_variant[grid](q, k, v, kd, vd, out, offs, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                   v.stride(0), v.stride(1), out.stride(0), out.stride(1), H, b["alpha"], 1.0 / n,
                                   D=D, MAX_LEN=n, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                   num_stages=stages, maxnreg=reg, **flags)

            name = "+".join(NAMES[s] for s in on) or "pair-major"
            try:
                out.fill_(float("nan"))
                run()
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                ms = triton.testing.do_bench(run, return_mode="median")
            except Exception as e:  # noqa: BLE001 (a variant the compiler refuses is a result too)
                print(f"| {bm}x{bn}, {warps}, {stages}, {reg} | {name} | failed: {str(e).splitlines()[0][:60]} | | |")
                continue
            print(f"| {bm}x{bn}, {warps}, {stages}, {reg} | {name} | {ms:.3f} | {fl / ms / 1e9:.1f} | {err:.1e} |",
                  flush=True)
    print("reproduce: python -m benchmarks.kernel_variants --n", n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
