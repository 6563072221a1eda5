"""Sharded checkpoints with ``torch.distributed.checkpoint``, committed atomically and signed.

A checkpoint is a directory ``step-<global step>`` holding the DCP shards of the model (sharded
embeddings and dense weights) and of both optimizers, every rank's RNG state, ``progress.json``
(epoch, step within the epoch, global step, the best epoch so far and its step) and ``signature.json``.
It is written under a temporary name and renamed only once every rank has finished, so a crash never
leaves a half-written checkpoint as the newest; the ``best`` marker beside the checkpoints is derived
from the newest checkpoint's progress and rewritten atomically, so the two cannot disagree.

Trust boundary: DCP reads ``.metadata`` with ``pickle`` and non-tensor entries with ``torch.load``
(``weights_only=False``), so **loading a checkpoint runs code that the checkpoint carries**. Every
checkpoint is therefore signed at save time: an HMAC-SHA256, keyed by a secret of the user's
(``~/.config/genrec/checkpoint.key``, created on first use, or the file ``$GENREC_CHECKPOINT_KEY``
names), over the SHA-256 of each of its files. ``load`` refuses a checkpoint whose signature does not
verify (written elsewhere, by another user, or altered) unless the caller trusts it explicitly
(``run.trust_checkpoints=true``, ``make eval ARGS=--trust-checkpoint``). On several nodes, rank 0 checks
the signature and every rank checks the hashes of its share of the files.

Example (inside a process group, as ``training.train`` does)::

    saved = save(run_dir / "checkpoints", dmp, optimizer, progress, keep=2)
    progress = load(saved, dmp, optimizer)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

log = logging.getLogger(__name__)

PREFIX = "step-"
BEST = "best"
SIGNATURE = "signature.json"
KEY_ENV = "GENREC_CHECKPOINT_KEY"
DEFAULT_KEY = Path("~/.config/genrec/checkpoint.key")


class UntrustedCheckpoint(RuntimeError):
    """The checkpoint's signature does not verify; loading it would run code it carries."""


@dataclass
class Progress:
    epoch: int = 0
    """The epoch in progress (0-based)."""
    step_in_epoch: int = 0
    """Optimizer steps already taken in that epoch: the data position to resume from."""
    global_step: int = 0
    best_metric: float = float("-inf")
    best_epoch: int = -1
    best_step: int = -1
    """Global step of the best epoch's checkpoint (-1: none yet); every rank knows it, no file is read."""

    @property
    def best_name(self) -> str | None:
        return checkpoint_name(self.best_step) if self.best_step >= 0 else None


def checkpoint_name(global_step: int) -> str:
    return f"{PREFIX}{global_step:08d}"


def save(
    root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: Progress, keep: int
) -> Path:
    """Writes ``root/step-<global_step>`` on all ranks, signs it, commits it by a rename, then updates
    the ``best`` marker and prunes all but the newest ``keep`` (and the best)."""
    rank = dist.get_rank()
    final = root / checkpoint_name(progress.global_step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=tmp)
    torch.save(_rng_state(), tmp / f"rng-rank{rank}.pt")
    dist.barrier()  # .metadata (rank 0) and every rank's files are complete
    if rank == 0:
        (tmp / "progress.json").write_text(json.dumps(asdict(progress)))
    _sign(tmp, rank)
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        write_best_marker(root, progress)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            if old.name != progress.best_name:  # the best epoch's weights are what the run reports and exports
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *, trust: bool = False
) -> Progress:
    """Loads a checkpoint in place (into the already sharded model and optimizer), after checking its
    signature (module docstring) unless ``trust``. Every rank must call it with the same ``path``."""
    if not trust:
        verify(path)
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
    return read_progress(path)


def read_progress(path: Path) -> Progress:
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


def write_best_marker(root: Path, progress: Progress) -> None:
    """Points ``root/best`` at ``progress``'s best checkpoint, atomically (a reader sees the old name or
    the new one, never a partial file); removes it when there is no best yet."""
    marker = root / BEST
    if progress.best_name is None:
        marker.unlink(missing_ok=True)
        return
    tmp = root / f".{BEST}.tmp"
    tmp.write_text(progress.best_name + "\n")
    os.replace(tmp, marker)


def latest(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


# --- signatures ------------------------------------------------------------------------------
def signing_key() -> bytes:
    """The user's checkpoint key, created (0600) on first use."""
    path = Path(os.environ.get(KEY_ENV, str(DEFAULT_KEY))).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return path.read_text().strip().encode()


def _sign(directory: Path, rank: int) -> None:
    """Each rank hashes the files it wrote; rank 0 gathers them and writes the signed list."""
    mine = [p for p in directory.iterdir() if _writer(p.name) == rank]
    digests = {p.name: _sha256(p) for p in mine}
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, digests)
    if rank == 0:
        files = {name: digest for part in parts for name, digest in part.items()}
        body = json.dumps(files, sort_keys=True)
        mac = hmac.new(signing_key(), body.encode(), hashlib.sha256).hexdigest()
        (directory / SIGNATURE).write_text(json.dumps({"files": files, "hmac": mac}, indent=1) + "\n")


def verify(path: Path) -> None:
    """Raises ``UntrustedCheckpoint`` on every rank unless ``path``'s signature verifies and every file it
    lists has its hash (rank 0 checks the HMAC; the ranks share the hashing)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    problem = [None]
    if rank == 0:
        problem[0] = _check_signature(path)
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is None:
        files = json.loads((path / SIGNATURE).read_text())["files"]
        mine = [name for i, name in enumerate(sorted(files)) if i % world == rank]
        bad = [name for name in mine if not (path / name).is_file() or _sha256(path / name) != files[name]]
        everyone: list = [None] * world
        dist.all_gather_object(everyone, bad)  # an object collective: NCCL has no CPU tensors
        bad = [name for names in everyone for name in names]
        if bad:
            problem[0] = f"{len(bad)} of its files differ from what was signed (e.g. {bad[0]})"
    if problem[0] is not None:
        raise UntrustedCheckpoint(
            f"refusing to load {path}: {problem[0]}. Checkpoints are pickles and loading one runs code, so only "
            f"checkpoints signed with this user's key ({KEY_ENV} or {DEFAULT_KEY}) are loaded. If you trust it, "
            "pass run.trust_checkpoints=true (training) or --trust-checkpoint (make eval).")


def _check_signature(path: Path) -> str | None:
    signature = path / SIGNATURE
    if not signature.is_file():
        return "it has no signature.json (not written by this project, or by a version before signing)"
    try:
        signed = json.loads(signature.read_text())
        body = json.dumps(signed["files"], sort_keys=True)
        expected = hmac.new(signing_key(), body.encode(), hashlib.sha256).hexdigest()
        ok = hmac.compare_digest(expected, str(signed["hmac"]))
    except (ValueError, KeyError, TypeError) as e:
        return f"its signature.json is malformed ({e})"
    if not ok:
        return "its signature was made with another key (another user's or machine's run) or altered"
    listed, present = set(signed["files"]), {p.name for p in path.iterdir() if p.name != SIGNATURE}
    if present - listed:
        return f"it holds files that were not signed: {sorted(present - listed)[:3]}"
    return None


def _writer(name: str) -> int | None:
    """The rank that wrote a checkpoint file: DCP's ``__<rank>_<n>.distcp``, ``rng-rank<r>.pt``; rank 0
    writes ``.metadata`` and ``progress.json``."""
    if name.startswith("__") and name.endswith(".distcp"):
        return int(name[2:].split("_", 1)[0])
    if name.startswith("rng-rank") and name.endswith(".pt"):
        return int(name[len("rng-rank"):-len(".pt")])
    if name in (".metadata", "progress.json"):
        return 0
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# --- RNG state -------------------------------------------------------------------------------
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
