"""Benchmark of the HSTU attention kernels (GPU): Triton vs PyTorch reference vs dense SDPA.

    python -m benchmarks.kernel                    # N in {256..4096}, H=4, d=128, bf16, ~512K tokens
    python -m benchmarks.kernel --n 4096 --bias    # with the relative bias (Triton and reference)

Work: one jagged batch per N of about ``--tokens`` tokens, sequence lengths uniform in [N/2, N],
random (not zero) inputs.  Compared side by side on the same batch:

* ``triton``: ``hstu_attention_triton`` (jagged, causal; autotuned on first use).
* ``pytorch``: ``hstu_attention_reference``, the op's specification: one sequence at a time, fp32
  math.  Forward+backward runs each sequence's forward and backward back to back (the same work;
  keeping every sequence's autograd graph alive at once would not fit in memory at N=4096).
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` on the batch padded
  to dense [B, H, N, d] (softmax attention, not HSTU's SiLU: the baseline a dense library offers).
  It computes the padding too; its TFLOP/s below count only the jagged work, so every row's
  TFLOP/s is comparable to the others and proportional to 1 / time.

FLOP convention: forward = 2 matmuls x 2*H*d*n(n+1)/2 per sequence of length n (causal, diagonal
included) = 2*H*d*n(n+1); forward+backward = 3.5x forward (backward counted as 2.5x forward: 5
matmuls where the forward has 2, the accounting of FlashAttention and Triton's tutorial; our dQ
kernel recomputes two more, which are not counted).  Times: median of
``triton.testing.do_bench`` after warm-up (the reference: one run after one warm-up; it takes
seconds).
With $OUT set, the full results go to $OUT/kernel_bench[_bias].json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
import time

import torch
import torch.nn.functional as F


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096], help="max sequence lengths")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=512 * 1024, help="tokens per batch (about)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--impls", nargs="+", default=["triton", "pytorch", "sdpa"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    p.add_argument("--bias", action="store_true", help="relative position/time bias (Triton and reference)")
    p.add_argument("--silu-sweep", action="store_true",
                   help="also time the Triton kernels with each SiLU mode at the largest N")
    p.add_argument("--breakdown", action="store_true",
                   help="per-kernel GPU times of one Triton forward+backward at the largest N (torch.profiler)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_batch(n_max, tokens, heads, dim, dtype, bias, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed + n_max)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(torch.randint(n_max // 2, n_max + 1, (1,), generator=g)))
    lengths = torch.tensor(lengths)
    L = int(lengths.sum())
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(device)
    q, k, v, do = (torch.randn(L, heads, dim, device=device, dtype=dtype) for _ in range(4))
    rab = None
    if bias:
        from models.ops.relative_bias import RelativeBias

        ts = torch.randint(0, 3600, (L,), generator=g).cumsum(0).to(device)
        rab = RelativeBias(torch.randn(2 * n_max - 1, device=device) * 0.1,
                           torch.randn(129, device=device) * 0.1, ts)
    return dict(lengths=lengths, offsets=offsets, q=q, k=k, v=v, do=do, rab=rab, n_max=n_max,
                alpha=1.0 / math.sqrt(dim))


def flops_fwd(lengths, heads, dim) -> float:
    n = lengths.double()
    return float((2 * heads * dim * n * (n + 1)).sum())


def _median_time_ms(fn, warmup=1, reps=3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench_triton(b, mode):
    import triton

    from models.ops.hstu_attention_triton import hstu_attention_triton

    leaves = [t.requires_grad_(mode != "fwd") for t in (b["q"], b["k"], b["v"])]
    rab = b["rab"]
    if rab is not None:
        rab.pos_weights.requires_grad_(mode != "fwd")
        rab.time_weights.requires_grad_(mode != "fwd")
        leaves += [rab.pos_weights, rab.time_weights]

    def fwd():
        return hstu_attention_triton(b["q"], b["k"], b["v"], b["offsets"], b["n_max"], b["alpha"], rab=rab)

    if mode == "fwd":
        with torch.no_grad():
            return triton.testing.do_bench(fwd, return_mode="median")
    return triton.testing.do_bench(lambda: fwd().backward(b["do"]), grad_to_none=leaves, return_mode="median")


def bench_pytorch(b, mode):
    from models.ops.hstu_attention_reference import hstu_attention_reference
    from models.ops.relative_bias import RelativeBias

    offs = b["offsets"].tolist()
    rab = b["rab"]

    def one(start, end, backward):
        q, k, v = (t[start:end].detach().requires_grad_(backward) for t in (b["q"], b["k"], b["v"]))
        r = None
        if rab is not None:
            r = RelativeBias(rab.pos_weights.detach().requires_grad_(backward),
                             rab.time_weights.detach().requires_grad_(backward), rab.timestamps[start:end])
        out = hstu_attention_reference(q, k, v, torch.tensor([0, end - start]), b["n_max"], b["alpha"], rab=r)
        if backward:
            out.backward(b["do"][start:end])

    def run():
        with torch.set_grad_enabled(mode != "fwd"):
            for i in range(len(offs) - 1):
                one(offs[i], offs[i + 1], mode != "fwd")

    return _median_time_ms(run, warmup=1, reps=1)  # seconds per run at small N: one timed run


def _pad(b):
    """The jagged batch as dense [B, H, N, d] (zeros past each sequence's end)."""
    B, n = len(b["lengths"]), b["n_max"]
    lengths = b["lengths"].to(b["q"].device)
    idx = torch.arange(n, device=lengths.device)[None, :]
    valid = idx < lengths[:, None]
    flat = (b["offsets"][:-1, None] + idx)[valid]

    def dense(t):
        t = t.detach()
        out = t.new_zeros(B, n, *t.shape[1:])
        out[valid] = t[flat]
        return out.transpose(1, 2).contiguous()

    return [dense(t) for t in (b["q"], b["k"], b["v"], b["do"])]


def bench_sdpa(b, mode, backend=None):
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, do = _pad(b)
    for t in (q, k, v):
        t.requires_grad_(mode != "fwd")
    backends = {"flash": [SDPBackend.FLASH_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION],
                "efficient": [SDPBackend.EFFICIENT_ATTENTION]}

    def fwd():
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with sdpa_kernel(backends[backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    try:
        if mode == "fwd":
            with torch.no_grad():
                return triton.testing.do_bench(fwd, return_mode="median")
        return triton.testing.do_bench(lambda: fwd().backward(do), grad_to_none=[q, k, v], return_mode="median")
    except RuntimeError as e:  # a backend that does not support this shape/device
        print(f"  sdpa[{backend}] {mode}: unavailable ({str(e).splitlines()[0][:80]})", flush=True)
        return float("nan")


def breakdown(n, args, dtype):
    """Per-kernel GPU time of one Triton forward+backward (after warm-up), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    from models.ops.hstu_attention_triton import hstu_attention_triton

    b = make_batch(n, args.tokens, args.heads, args.dim, dtype, args.bias, args.seed)
    for t in (b["q"], b["k"], b["v"]):
        t.requires_grad_()

    def step():
        out = hstu_attention_triton(b["q"], b["k"], b["v"], b["offsets"], b["n_max"], b["alpha"], rab=b["rab"])
        out.backward(b["do"])

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"-- per-kernel GPU time at N={n} (mean of 5 forward+backward steps):", flush=True)
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
        print(f"   {e.key[:60]:60s} {e.device_time_total / 5 / 1e3:8.3f} ms", flush=True)


def parity(b) -> dict:
    """Relative error of the Triton result (bf16) against the fp32 reference on the first sequences."""
    from models.ops.hstu_attention_reference import hstu_attention_reference
    from models.ops.hstu_attention_triton import hstu_attention_triton
    from models.ops.relative_bias import RelativeBias

    n_seq = min(8, len(b["lengths"]))
    end = int(b["offsets"][n_seq])
    offs = b["offsets"][: n_seq + 1]
    lo = [b[x][:end].detach().clone().requires_grad_() for x in ("q", "k", "v")]
    hi = [t.detach().float().requires_grad_() for t in lo]
    rab_lo = rab_hi = None
    if b["rab"] is not None:
        r = b["rab"]
        rab_lo = RelativeBias(r.pos_weights.detach(), r.time_weights.detach(), r.timestamps[:end])
        rab_hi = rab_lo
    out = hstu_attention_triton(*lo, offs, b["n_max"], b["alpha"], rab=rab_lo)
    ref = hstu_attention_reference(*hi, offs, b["n_max"], b["alpha"], rab=rab_hi)
    do = b["do"][:end]
    g = torch.autograd.grad(out, lo, do)
    gr = torch.autograd.grad(ref, hi, do.float())

    def err(a, r):
        if torch.isnan(a).any():
            return float("nan")
        return float((a.detach().float() - r.detach()).norm() / r.detach().norm())

    return {name: err(a, r) for name, a, r in zip(("out", "dq", "dk", "dv"), (out, *g), (ref, *gr), strict=True)}


def main(argv=None):
    args = _args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.kernel needs a CUDA GPU")
    import triton

    from models.ops import hstu_attention_triton as hat

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    card = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    cli = sys.argv[1:] if argv is None else argv
    command = "python -m benchmarks.kernel " + " ".join(shlex.quote(a) for a in cli)
    header = (f"# HSTU attention benchmark: {card}, {date}, torch {torch.__version__}, triton {triton.__version__}\n"
              f"# H={args.heads} d={args.dim} {args.dtype} ~{args.tokens} tokens/batch, lengths U[N/2, N], "
              f"bias={'on' if args.bias else 'off'}, SiLU mode={os.environ.get('HSTU_ATTN_SILU', 'tanh')}, "
              f"time steps={hat.time_steps()}\n"
              f"# reproduce: {command}")
    print(header, flush=True)
    rows = []

    def record(n, impl, mode, ms, fl, extra=None):
        tflops = fl / (ms * 1e-3) / 1e12 if ms == ms else float("nan")
        row = dict(n=n, impl=impl, mode=mode, ms=ms, tflops=tflops, **(extra or {}))
        rows.append(row)
        print(f"N={n:5d} {impl:18s} {mode:8s} {ms:9.3f} ms {tflops:7.1f} TFLOP/s", flush=True)

    for n in args.n:
        b = make_batch(n, args.tokens, args.heads, args.dim, dtype, args.bias, args.seed)
        fl = flops_fwd(b["lengths"], args.heads, args.dim)
        print(f"-- N={n}: {len(b['lengths'])} sequences, {int(b['lengths'].sum())} tokens, "
              f"forward {fl / 1e12:.3f} TFLOP", flush=True)
        for mode in args.modes:
            mult = 1.0 if mode == "fwd" else 3.5
            if "triton" in args.impls:
                t0 = time.time()
                ms = bench_triton(b, mode)
                record(n, "triton", mode, ms, fl * mult, {"configs": hat.chosen_configs(),
                                                          "wall_s_incl_tuning": time.time() - t0})
            if "pytorch" in args.impls:
                record(n, "pytorch-reference", mode, bench_pytorch(b, mode), fl * mult)
            if "sdpa" in args.impls and not args.bias:
                record(n, "sdpa", mode, bench_sdpa(b, mode), fl * mult)
                for backend in ("flash", "cudnn"):
                    record(n, f"sdpa[{backend}]", mode, bench_sdpa(b, mode, backend), fl * mult)
        if "triton" in args.impls:
            p = parity(b)
            rows.append(dict(n=n, impl="triton", mode="parity-vs-fp32-reference", **p))
            print(f"N={n:5d} parity (rel. err vs fp32 reference, 8 sequences): "
                  + " ".join(f"{k}={v:.2e}" for k, v in p.items()), flush=True)
        del b
        torch.cuda.empty_cache()

    if args.breakdown and "triton" in args.impls:
        breakdown(max(args.n), args, dtype)

    if args.silu_sweep and "triton" in args.impls:
        n = max(args.n)
        b = make_batch(n, args.tokens, args.heads, args.dim, dtype, args.bias, args.seed)
        fl = flops_fwd(b["lengths"], args.heads, args.dim)
        prev = os.environ.get("HSTU_ATTN_SILU")
        for mode_name in ("tanh", "exact"):
            os.environ["HSTU_ATTN_SILU"] = mode_name
            for mode in args.modes:
                ms = bench_triton(b, mode)
                record(n, f"triton[silu={mode_name}]", mode, ms, fl * (1.0 if mode == "fwd" else 3.5),
                       {"configs": hat.chosen_configs()})
            p = parity(b)
            print(f"   parity silu={mode_name}: " + " ".join(f"{k}={v:.2e}" for k, v in p.items()), flush=True)
        if prev is None:
            os.environ.pop("HSTU_ATTN_SILU")
        else:
            os.environ["HSTU_ATTN_SILU"] = prev

    # Summary table (markdown), last in the output.
    table = ["| N | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |", "|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        if r["mode"] in ("fwd", "fwd+bwd") and (r["n"], r["impl"]) not in keys:
            keys.append((r["n"], r["impl"]))
    for n, impl in keys:
        cells = []
        for mode in ("fwd", "fwd+bwd"):
            r = next((r for r in rows if r["n"] == n and r["impl"] == impl and r["mode"] == mode), None)
            cells += [f"{r['ms']:.3f}", f"{r['tflops']:.1f}"] if r else ["", ""]
        table.append(f"| {n} | {impl} | " + " | ".join(cells) + " |")
    md = header + "\n\n" + "\n".join(table) + "\n"
    print("\n" + md, flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        stem = "kernel_bench_bias" if args.bias else "kernel_bench"
        with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
            json.dump(dict(card=card, date=date, command=command, torch=torch.__version__, triton=triton.__version__,
                           args=vars(args), rows=rows), f, indent=1, default=str)
        with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
