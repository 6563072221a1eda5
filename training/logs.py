"""What a training or evaluation run prints: our own INFO lines, the libraries' warnings that matter.

TorchRec's planner logs ~90 lines of estimates at INFO (the plan itself goes to ``plan.txt``), FBGEMM
logs every table's constructor arguments through the root logger, and a few library warnings fire on
every run although nothing is wrong. ``setup(verbose=False)`` keeps them out of the log;
``--verbose`` shows everything.

Example (what ``training.train.main`` does first)::

    setup(verbose=args.verbose)
"""

from __future__ import annotations

import logging
import sys
import warnings

QUIET_LOGGERS = ("torchrec", "torch.fx._symbolic_trace")
"""INFO chatter (and, for the fx tracer, a warning about its own API) on every run."""

HARMLESS_WARNINGS = (
    # (category, message regex, why it is harmless here)
    (FutureWarning, r"`broadcast_buffers` is deprecated",
     "TorchRec's DDP wrapper passes the old argument; nothing here sets it"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
     "TorchRec hands sharded tables to us as ShardedTensors (the table init reads their offsets)"),
    (UserWarning, r"TBE B200 optimization",
     "FBGEMM reports that a Blackwell-only path is off on other GPUs"),
)


class _NotFromFBGEMM(logging.Filter):
    """FBGEMM's table classes log their arguments at INFO on the root logger; keep its warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/fbgemm_gpu/" not in record.pathname


def setup(verbose: bool = False) -> None:
    """Configures the process's logging: INFO for us, WARNING for the libraries, unless ``verbose``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    if verbose:
        return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if name.startswith("torch.fx") else logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_NotFromFBGEMM())
    for category, message, _why in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
