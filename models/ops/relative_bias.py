"""The relative attention bias of HSTU: a learned weight per relative position and per log time gap.

bias(i, j) = pos_weights[max_seq_len - 1 + j - i] + time_weights[bucket(t_i - t_j)], with
bucket(dt) = clamp(floor(ln(max(|dt|, 1)) / time_bucket_scale), 0, num_time_buckets).
It is passed to the attention op as parameters + timestamps, never as an [N, N] tensor, so the
kernel can compute it in place.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


def time_gap_bucket(dt: torch.Tensor, scale: float, num_buckets: int) -> torch.Tensor:
    """clamp(floor(ln(max(|dt|, 1)) / scale), 0, num_buckets), in float64: the one definition of the
    time bucket (the Triton kernel derives its exact integer thresholds from this function)."""
    dt = dt.abs().clamp(min=1).double()
    return torch.floor(torch.log(dt) / scale).long().clamp(0, num_buckets)


@functools.cache
def bucket_thresholds(scale: float, num_buckets: int) -> torch.Tensor:
    """int64 [num_buckets + 2] on the CPU: thresholds[c] = the smallest gap dt >= 1 whose bucket
    (``time_gap_bucket``) is >= c, for c <= num_buckets; int64 max where it does not fit and for
    c = num_buckets + 1 (so the Triton kernels need no clamp). With them a bucket is an integer search,
    exact for gaps below ~2^40 s (beyond, float64's ln cannot separate neighbouring integers)."""
    big = torch.iinfo(torch.int64).max
    out = [1]
    for c in range(1, num_buckets + 1):
        guess = math.exp(c * scale)
        if guess > 2.0**62:
            out.append(big)
            continue
        base = max(int(guess) - 4, 1)
        cand = torch.arange(base, base + 10, dtype=torch.int64)
        ok = time_gap_bucket(cand, scale, num_buckets + 1) >= c
        out.append(int(cand[ok.nonzero()[0, 0]]) if ok.any() else base + 10)
    out.append(big)  # bucket num_buckets + 1 does not exist: the kernels' estimate c = num_buckets + 1 -> c - 1
    return torch.tensor(out, dtype=torch.int64)


@functools.cache
def thresholds_on(scale: float, num_buckets: int, device: torch.device) -> torch.Tensor:
    """``bucket_thresholds`` on ``device``, copied there once per device (a copy per call would also
    stall a CUDA graph's capture)."""
    return bucket_thresholds(scale, num_buckets).to(device)


def gap_buckets(gaps: torch.Tensor, scale: float, num_buckets: int) -> torch.Tensor:
    """``time_gap_bucket`` of int64 ``gaps`` by an integer search in ``bucket_thresholds`` (one op
    instead of float64 abs/log/floor/clamp over every pair)."""
    thresholds = thresholds_on(scale, num_buckets, gaps.device)[1 : num_buckets + 1]
    return torch.bucketize(gaps.abs(), thresholds, right=True)


@dataclass
class RelativeBias:
    """Inputs of the relative bias for one batch (shared by all heads).

    Attributes:
        pos_weights: [2 * max_seq_len - 1] learned weight for each relative position j - i.
        time_weights: [num_time_buckets + 1] learned weight for each log time-gap bucket.
        timestamps: [L] int64 timestamps of the batch's tokens (seconds).
        time_bucket_scale: divisor of ln|dt| (generative-recommenders uses 0.301).
    """

    pos_weights: torch.Tensor
    time_weights: torch.Tensor
    timestamps: torch.Tensor
    time_bucket_scale: float = 0.301

    @property
    def num_time_buckets(self) -> int:
        return self.time_weights.numel() - 1

    def buckets(self, t_query: torch.Tensor, t_key: torch.Tensor) -> torch.Tensor:
        """Bucket index of |t_query - t_key| (broadcasting)."""
        return time_gap_bucket(t_query - t_key, self.time_bucket_scale, self.num_time_buckets)

    def dense(self, start: int, end: int, max_seq_len: int) -> torch.Tensor:
        """[n, n] bias of the tokens start..end (one sequence); for the reference and tests."""
        n = end - start
        if n > max_seq_len:
            raise ValueError(f"sequence of length {n} exceeds max_seq_len={max_seq_len}")
        if self.pos_weights.numel() < 2 * max_seq_len - 1:
            raise ValueError(
                f"pos_weights has {self.pos_weights.numel()} entries; max_seq_len={max_seq_len} needs "
                f"{2 * max_seq_len - 1}"
            )
        idx = torch.arange(n, device=self.pos_weights.device)
        rel = idx[None, :] - idx[:, None] + max_seq_len - 1
        ts = self.timestamps[start:end]
        return self.pos_weights[rel] + self.time_weights[self.buckets(ts[:, None], ts[None, :])]

