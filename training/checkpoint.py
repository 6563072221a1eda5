"""Sharded checkpoints with ``torch.distributed.checkpoint``.

A checkpoint is a directory ``step-<global step>`` holding the DCP shards of the model (sharded
embeddings and dense weights) and of both optimizers, every rank's RNG state, and ``progress.json``
(epoch, step within the epoch, global step). It is written under a temporary name and renamed only
once every rank has finished, so a crash never leaves a half-written checkpoint as the newest.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

log = logging.getLogger(__name__)

PREFIX = "step-"
BEST = "best"


@dataclass
class Progress:
    epoch: int = 0
    """The epoch in progress (0-based)."""
    step_in_epoch: int = 0
    """Optimizer steps already taken in that epoch: the data position to resume from."""
    global_step: int = 0
    best_metric: float = float("-inf")
    best_epoch: int = -1


def save(
    root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: Progress, keep: int
) -> Path:
    """Writes ``root/step-<global_step>`` on all ranks; prunes all but the newest ``keep``."""
    rank = dist.get_rank()
    final = root / f"{PREFIX}{progress.global_step:08d}"
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=tmp)
    torch.save(_rng_state(), tmp / f"rng-rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "progress.json").write_text(json.dumps(asdict(progress)))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        best = best_checkpoint(root)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            if old != best:  # the best epoch's weights are what the run reports and exports
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> Progress:
    """Loads a checkpoint in place (into the already sharded model and optimizer)."""
    state: dict = {"model": model.state_dict()}
    if optimizer is not None:
        _init_lazy_state(optimizer)
        state["optim"] = optimizer.state_dict()
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    rng = path / f"rng-rank{dist.get_rank()}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=True))
    return Progress(**json.loads((path / "progress.json").read_text()))


def _init_lazy_state(optimizer: torch.optim.Optimizer) -> None:
    """DCP loads in place, into the tensors the optimizer already has; AdamW only creates its moments
    at the first step, so a fresh one would silently load nothing. A zero-gradient step creates them
    (the weights it nudges are overwritten by the load)."""
    parts = getattr(optimizer, "optimizers", [("", optimizer)])
    for _, part in parts:
        if not part.state and hasattr(part, "init_state"):
            part.init_state()


def list_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints under ``root``, oldest first (temporary directories are ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def best_checkpoint(root: Path) -> Path | None:
    """The checkpoint that ``root/best`` names (the best epoch by the validation metric), if any."""
    marker = root / BEST
    return root / marker.read_text().strip() if marker.exists() else None


def mark_best(root: Path, checkpoint: Path) -> None:
    (root / BEST).write_text(checkpoint.name + "\n")


def latest(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    # Python's RNG state is a tuple of ints; stored as a tensor so weights_only loading works.
    version, internal, gauss = random.getstate()
    state["python"] = torch.tensor([version, *internal], dtype=torch.int64)
    state["python_gauss"] = torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64)
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "python" in state:
        version, *internal = state["python"].tolist()
        gauss = state["python_gauss"].item()
        random.setstate((version, tuple(internal), None if gauss != gauss else gauss))
