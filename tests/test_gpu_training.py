"""Training on GPUs (NCCL): the layouts the CPU cannot run, against the one-GPU run.

Data-parallel tables need CUDA (FBGEMM's CPU kernel pools sequence lookups), so their equivalence is
checked here: on one GPU, a data-parallel layout against the planner's; on two or more GPUs, every
sharding kind on two ranks against one GPU. Run with ``make test-all`` or ``pytest -m gpu`` on a GPU
machine. Tolerances are looser than on the CPU (``tests/test_rank_equivalence.py``): FBGEMM's CUDA
backward sums duplicate ids with atomics, in no fixed order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.launch import step_losses, torchrun
from tests.test_rank_equivalence import CONFIG
from training.config import ShardingKind

pytestmark = pytest.mark.gpu

GPU = {**CONFIG, "run": {**CONFIG["run"], "device": "cuda", "bf16": False}}
LOSS_RTOL = 1e-3


def two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return tmp_path_factory.mktemp("gpu")


@pytest.fixture(scope="module")
def one_gpu(tmp: Path) -> Path:
    return torchrun(tmp, "one-gpu", nproc=1, config=GPU)


def assert_same_losses(a: Path, b: Path) -> None:
    x, y = step_losses(a), step_losses(b)
    assert sorted(x) == sorted(y)
    for step in x:
        assert y[step] == pytest.approx(x[step], rel=LOSS_RTOL), (step, x, y)


def test_one_gpu_data_parallel_tables_train_as_sharded_ones(tmp: Path, one_gpu: Path) -> None:
    dp = torchrun(tmp, "one-gpu-dp", "sharding.tables={item_table: data_parallel, rating_table: data_parallel}",
                  nproc=1, config=GPU)
    assert "data_parallel" in (dp / "plan.txt").read_text()
    assert_same_losses(one_gpu, dp)


@pytest.mark.skipif(not two_gpus(), reason="needs two GPUs")
@pytest.mark.parametrize("kind", list(ShardingKind))
def test_two_gpus_train_as_one(kind: ShardingKind, tmp: Path, one_gpu: Path) -> None:
    two = torchrun(tmp, f"two-gpu-{kind}", f"sharding.tables={{item_table: {kind}, rating_table: {kind}}}",
                   nproc=2, config=GPU)
    assert_same_losses(one_gpu, two)
