"""The checkpoint trust boundary: loading a DCP checkpoint unpickles it, so only checkpoints signed with
the user's key load (``training.checkpoint``); a crafted one is refused before any of it is read."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import ROOT, TINY, torchrun
from training.checkpoint import KEY_ENV, SIGNATURE, latest


class _RunsCode:
    """Unpickling this writes a file: what a crafted ``.metadata`` could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("trust")
    return torchrun(tmp, "signed", "run.max_steps=2", nproc=1, config={**TINY, "sharding": {}})


def evaluate(run: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.evaluate", "--run", str(run), "--checkpoint", "latest",
                           "--baseline-run", "none", "--out", str(run / "eval-trust"), *args], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True, text=True,
                          timeout=300)


def crafted_copy(run: Path, tmp: Path) -> tuple[Path, Path]:
    """A copy of ``run`` whose newest checkpoint's .metadata is a pickle that runs code."""
    copy = tmp / "crafted"
    shutil.copytree(run, copy)
    marker = tmp / "pwned"
    (latest(copy / "checkpoints") / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    return copy, marker


def test_a_signed_checkpoint_loads(run: Path) -> None:
    proc = evaluate(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (latest(run / "checkpoints") / SIGNATURE).is_file()


def test_a_crafted_checkpoint_is_refused_before_it_runs_anything(run: Path, tmp_path: Path) -> None:
    copy, marker = crafted_copy(run, tmp_path)
    proc = evaluate(copy)
    assert proc.returncode != 0 and "refusing to load" in proc.stderr, proc.stderr[-3000:]
    assert "differ from what was signed" in proc.stderr
    assert not marker.exists()
    # The boundary is real: trusted explicitly, the same checkpoint runs its code.
    evaluate(copy, "--trust-checkpoint")
    assert marker.read_text() == "pwned"


def test_a_checkpoint_signed_with_another_key_is_refused(run: Path, tmp_path: Path) -> None:
    proc = evaluate(run, env={KEY_ENV: str(tmp_path / "someone-else.key")})
    assert proc.returncode != 0 and "another key" in proc.stderr, proc.stderr[-3000:]


def test_resume_refuses_a_crafted_checkpoint(run: Path, tmp_path: Path) -> None:
    copy, marker = crafted_copy(run, tmp_path)
    config = tmp_path / "resume.yaml"
    config.write_text((copy / "config.yaml").read_text().replace(f"out_dir: {run.parent}", f"out_dir: {tmp_path}"))
    proc = subprocess.run([sys.executable, "-m", "training.train", "--config", str(config), "--resume",
                           f"run.name={copy.name}", "run.max_steps=4"], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "refusing to load" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists()
