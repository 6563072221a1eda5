"""One Triton config at a time for each HSTU attention kernel (GPU): which tile shapes are fastest.

    python -m benchmarks.kernel_configs [--n 4096]
    python -m benchmarks.kernel_configs --bias     # the bias variants, pipelined key loops against not

For each candidate config of one kernel (the other two keep their first candidate), times the
forward (fwd kernel) or forward+backward (dq, dkdv kernels) on ``benchmarks.kernel``'s batch
(~512K tokens, lengths uniform in [N/2, N], H=4, d=128, bf16, no bias), end to end with
``triton.testing.do_bench`` and, for the forward, also replayed from a CUDA graph (GPU time alone,
no host work). A config that fails to compile (shared memory, registers) is reported and skipped.
With ``--bias`` the batch carries the relative bias with trainable tables (the dK/dV kernel's
"bias_grad" variant) and each forward and dQ candidate runs with its key loops software-pipelined and not.
The winners belong in ``_CONFIGS`` of ``models/ops/hstu_attention_triton.py``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
import triton

from benchmarks.kernel import flops_fwd, make_batch
from models.ops import hstu_attention_triton as hat

C = hat.tile_config
CANDIDATES = {
    "fwd": [
        C(128, 64, 8, 3),
        C(128, 64, 8, 2, maxnreg=128),
        C(128, 32, 8, 3, maxnreg=128),
        C(128, 32, 8, 4, maxnreg=128),
        C(128, 64, 8, 4),
        C(128, 128, 8, 2),
        C(128, 128, 8, 3),
        C(128, 64, 4, 3),
        C(256, 64, 8, 2),
        C(256, 32, 8, 3),
        C(128, 32, 4, 3),
        C(64, 64, 4, 3),
        C(128, 64, 8, 3, maxnreg=168),
        C(128, 32, 8, 5, maxnreg=128),
        C(128, 32, 8, 6, maxnreg=128),
        C(128, 32, 8, 4),
        C(128, 16, 8, 4, maxnreg=128),
        C(128, 64, 8, 3, maxnreg=128),
        C(128, 64, 8, 4, maxnreg=128),
        C(256, 32, 8, 4),
        C(128, 32, 8, 4, maxnreg=96),
    ],
    "dq": [
        C(128, 64, 8, 3),
        C(128, 32, 8, 3),
        C(128, 32, 8, 3, maxnreg=128),
        C(128, 128, 8, 2),
        C(64, 64, 4, 3),
        C(128, 64, 8, 2, maxnreg=128),
        C(128, 64, 4, 3),
    ],
    "dkdv": [
        C(32, 128, 8, 3, True),
        C(64, 128, 8, 2, True),
        C(64, 128, 8, 3, True),
        C(32, 128, 4, 3, True),
        C(64, 64, 4, 3, True),
        C(128, 128, 8, 2, True),
        C(64, 128, 8, 2, True, maxnreg=128),
    ],
}

# --bias: the forward and dQ candidates each with their key loops pipelined (None) and not (1);
# the dK/dV kernel's loops over queries have no such switch.
BIAS_CANDIDATES = {
    "fwd": [C(bm, bn, w, st, loop_stages=ls) for bm, bn, w, st in [(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3),
                                                                   (64, 64, 4, 2)] for ls in (None, 1)],
    "dq": [C(bm, bn, w, st, loop_stages=ls) for bm, bn, w, st in [(128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2)]
           for ls in (None, 1)],
    "dkdv": [C(16, 128, 8, 3, True), C(16, 64, 4, 3, True), C(32, 64, 4, 2, True)],
}


def _time(which: str, cfg: triton.Config, fwd: Callable[[], torch.Tensor], grad: torch.Tensor,
          leaves: list[torch.Tensor]) -> tuple[float, float, float]:
    """(ms end to end, ms replayed from a CUDA graph or NaN, FLOP multiplier) of ``which`` run
    with ``cfg``: the forward alone for the fwd kernel, forward + backward for the others."""
    with hat.kernel_configs(**{which: cfg}):
        if which == "fwd":
            with torch.no_grad():
                return (triton.testing.do_bench(fwd, return_mode="median"),
                        triton.testing.do_bench_cudagraph(fwd, return_mode="median"), 1.0)
        for t in leaves:
            t.requires_grad_(True)
        try:
            ms = triton.testing.do_bench(lambda: fwd().backward(grad), grad_to_none=leaves, return_mode="median")
        finally:
            for t in leaves:
                t.requires_grad_(False)
        return ms, float("nan"), 3.5


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--kernels", nargs="+", default=["fwd", "dq", "dkdv"])
    p.add_argument("--bias", action="store_true", help="the bias variants, fwd/dq with and without loop pipelining")
    args = p.parse_args(argv)
    os.environ["HSTU_ATTN_AUTOTUNE"] = "0"
    b = make_batch(args.n, 512 * 1024, 4, 128, torch.bfloat16, args.bias, 0)
    fl = flops_fwd(b["lengths"], 4, 128)
    candidates = BIAS_CANDIDATES if args.bias else CANDIDATES
    rab_leaves = [b["rab"].pos_weights, b["rab"].time_weights] if args.bias else []

    def fwd():
        return hat.hstu_attention_triton(b["q"], b["k"], b["v"], b["offsets"], b["n_max"], b["alpha"], rab=b["rab"])

    print(f"{torch.cuda.get_device_name()}  N={args.n}  tokens={b['q'].shape[0]}  forward {fl / 1e12:.3f} TFLOP")
    print("| kernel | config | ms (end to end) | TFLOP/s | ms (CUDA graph) | TFLOP/s |\n|---|---|--:|--:|--:|--:|")
    for which in args.kernels:
        for cfg in candidates[which]:
            try:
                ms, graph_ms, mult = _time(which, cfg, fwd, b["do"], [b["q"], b["k"], b["v"], *rab_leaves])
            except Exception as e:  # noqa: BLE001 (a config the compiler refuses is a result too)
                print(f"| {which} | {cfg} | failed: {str(e).splitlines()[0][:60]} | | | |", flush=True)
                continue
            print(
                f"| {which} | {cfg} | {ms:.3f} | {mult * fl / ms / 1e9:.1f} | {graph_ms:.3f} | "
                f"{fl / graph_ms / 1e9:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
