"""Typed training configuration: dataclasses loaded from YAML, overridable as ``key=value``.

Example::

    >>> cfg = load_config("configs/ml-1m/hstu.yaml", ["run.epochs=3", "optim.lr=2e-3"])
    >>> cfg.run.epochs, cfg.optim.lr
    (3, 0.002)
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data.formats import Columns, IdType, ReadOptions
from data.prepare import DatasetSpec
from data.splits import SeenItems, SplitConfig
from data.streaming import KCore
from data.synthetic import SyntheticConfig
from models.config import ModelConfig


class SparseOptimizer(enum.StrEnum):
    """The embedding optimizer, fused into the backward by FBGEMM.

    FBGEMM's CPU kernels only implement (row-wise) Adagrad and SGD; Adam is GPU-only.
    AUTO picks Adam on CUDA (as generative-recommenders trains) and row-wise Adagrad on CPU.
    """

    AUTO = "auto"
    ADAM = "adam"
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    EXACT_ADAGRAD = "exact_adagrad"
    SGD = "sgd"


class ShardingKind(enum.StrEnum):
    """How one embedding table is laid out over the ranks (TorchRec's ShardingType values).

    DATA_PARALLEL replicates the table on every rank and all-reduces its whole gradient each step: for
    small tables only (the rating table), never for a catalogue.
    """

    TABLE_WISE = "table_wise"
    ROW_WISE = "row_wise"
    COLUMN_WISE = "column_wise"
    DATA_PARALLEL = "data_parallel"


class EmbeddingKernel(enum.StrEnum):
    """Where a table's rows live and how they are updated (TorchRec's compute kernels).

    FUSED: in device memory (host memory on CPU), the optimizer fused into FBGEMM's backward.
    FUSED_UVM_CACHING: in host memory, with the most used ``ShardingConfig.cache_load_factor`` of the rows
        cached in device memory: a table larger than the GPU (CUDA only).
    FUSED_UVM: in host memory, read over PCIe on every lookup, no cache (CUDA only).
    A DATA_PARALLEL table always uses TorchRec's dense kernel (the only one it allows).
    """

    FUSED = "fused"
    FUSED_UVM_CACHING = "fused_uvm_caching"
    FUSED_UVM = "fused_uvm"


@dataclass
class DataConfig:
    dataset: str = "ml-1m"
    """"ml-1m", "synthetic", or the path of an event file (csv, Parquet, a MovieLens/Amazon/RecBole
    format). ``python -m data.prepare --config <this file>`` prepares it (``make train`` does, first);
    training only opens it."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Its size and shape when ``dataset`` is "synthetic" (``data.synthetic.SyntheticConfig``)."""
    root: str = "datasets"
    name: str = ""
    """The prepared dataset's folder under ``root``; "" names it after the dataset."""
    format: str = ""
    """The file's format (``data.formats.Format``: movielens-csv, movielens-dat, amazon-csv, recbole-inter,
    csv, parquet); "" tells it from the file."""
    columns: Columns = field(default_factory=Columns)
    """csv/Parquet: which column holds user, item, timestamp, rating ("": a column named "rating" if
    any, else implicit feedback) and event_type ("": none) (``data.formats.Columns``)."""
    implicit: bool = False
    """Ignore any rating column: every event is an interaction."""
    event_types: list[str] = field(default_factory=list)
    """Keep only events of these types (needs ``columns.event_type``); empty keeps all."""
    id_type: IdType = IdType.STRING
    """csv: ids as strings (exact) or "int" (faster, numeric order; leading zeros are lost)."""
    delimiter: str = ","
    """csv: the field delimiter."""
    column_names: list[str] = field(default_factory=list)
    """csv without a header line: its column names."""
    min_user_events: int = 2
    """The k-core filter: users with fewer events are dropped, and items with fewer than
    ``min_item_events``, repeatedly until none falls short (``data.sequences``). 2 is the least a
    leave-one-out split can use."""
    min_item_events: int = 1
    split: SplitConfig = field(default_factory=SplitConfig)
    """Leave-one-out (default) or temporal, by two cut times (``data.splits``)."""
    batch_size: int = 128
    """The global batch: split evenly over the ranks, so a config trains the same model on any number."""
    eval_batch_size: int = 256
    """Per rank; evaluation results do not depend on it."""
    valid_users: int = 0
    """Validate each epoch on a fixed random sample of this many users (0: all of them), e.g. 100,000
    of 10M users; the test pass always ranks every user."""
    num_negatives: int = 128
    """Size of the negative pool shared by all positions of a batch."""
    exclude_validation_from_train: bool = False
    """Train on s[:n-2] instead of s[:n-1], so the validation target is never seen in training."""
    exclude_seen: SeenItems = SeenItems.HISTORY
    """What a user has seen, never recommended: the whole history or only the model's window
    (``data.splits.SeenItems``). Evaluation, predictions and the export (the server's default) use it;
    evaluation also reports the window's numbers (generative-recommenders' protocol) as ``window/*``."""
    num_workers: int = 0

    def spec(self) -> DatasetSpec:
        """The dataset to prepare and open: everything above that decides what the prepared files hold."""
        read = ReadOptions(columns=self.columns, implicit=self.implicit, id_type=self.id_type,
                           delimiter=self.delimiter, column_names=tuple(self.column_names))
        return DatasetSpec(dataset=self.dataset, root=self.root, name=self.name, format=self.format, read=read,
                           event_types=tuple(self.event_types), kcore=KCore(self.min_user_events, self.min_item_events),
                           synthetic=self.synthetic)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0
    """Max global norm of the dense gradients; 0 disables clipping."""
    sparse_optimizer: SparseOptimizer = SparseOptimizer.AUTO
    sparse_lr: float = 0.0
    """Learning rate of the fused embedding optimizer; 0 means ``lr``."""
    sparse_eps: float = 1e-8


@dataclass
class ShardingConfig:
    tables: dict[str, ShardingKind] = field(default_factory=dict)
    """Sharding type per table name; a table not listed is left to the planner's choice."""
    kernels: dict[str, EmbeddingKernel] = field(default_factory=dict)
    """Compute kernel per table name; a table not listed gets FUSED."""
    cache_load_factor: float = 0.2
    """FUSED_UVM_CACHING: the share of a table's rows that the device cache holds."""
    device_memory_gb: float = 0.0
    """Device memory per rank: what the planner plans with and (CUDA) what the process may allocate;
    0 = the card's own (on CPU: host memory)."""
    reserved_fraction: float = 0.3
    """Share of ``device_memory_gb`` the planner leaves to the dense model and activations."""


@dataclass
class RunConfig:
    name: str = ""
    """Run directory name under ``out_dir``; empty means <config stem>-<timestamp>."""
    out_dir: str = "runs"
    epochs: int = 101
    seed: int = 42
    device: str = "auto"
    """"auto" (CUDA when present), "cpu" or "cuda"."""
    bf16: bool = True
    """bf16 autocast for the dense forward on CUDA (ignored on CPU)."""
    eval_every: int = 1
    """Evaluate every N epochs (and always after the last)."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (0: run all epochs). For quick looks and tests."""
    steps_per_epoch: int = 0
    """Cap on steps per epoch (0: the whole epoch)."""
    checkpoint_every: int = 0
    """Also checkpoint every N steps within an epoch (0: only at epoch ends)."""
    keep_checkpoints: int = 2
    resume: bool = False
    topk: int = 200
    """Length of the recommendation lists written to predictions.parquet."""
    tensorboard: bool = True
    collective_timeout_s: int = 600
    """A collective that waits longer than this (a rank died or went astray) fails the run."""
    trust_checkpoints: bool = False
    """Load (``--resume``) checkpoints whose signature does not verify: checkpoints are pickles, and
    loading one runs code it carries (``training.checkpoint``). Only for checkpoints you trust."""


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    run: RunConfig = field(default_factory=RunConfig)


# --- loading ---------------------------------------------------------------------------------
def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Reads a YAML file into a ``TrainConfig`` and applies ``section.key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        key, value = item.split("=", 1)
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return _build(TrainConfig, raw, "")


def to_dict(cfg: Any) -> Any:
    """A plain-YAML view of a config (Enums as their values, tuples as lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


MOVED = {"data.max_len": "model.max_seq_len"}
"""Keys that are gone, and where their knob lives now (one name per knob)."""


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"config section {where or '<root>'} must be a mapping, got {raw!r}")
    for key in raw:
        if (moved := MOVED.get(f"{where}{key}")) is not None:
            raise ValueError(f"config key {where}{key} is gone: the sequence window is {moved}, read by data, "
                             "training and serving alike; delete the key (and set that one)")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        hints = [f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, names, 1)) else
                 repr(key) for key in sorted(unknown)]
        raise ValueError(f"unknown config key {', '.join(hints)} in {where or '<root>'}; known: {sorted(names)}")
    kwargs = {name: _coerce(hints[name], value, f"{where}{name}") for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value or {}, where + ".")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not one of {[e.value for e in tp]}") from None
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, where)
    if origin is dict:
        _, vt = typing.get_args(tp)
        return {k: _coerce(vt, v, f"{where}.{k}") for k, v in (value or {}).items()}
    if origin is list:
        (vt,) = typing.get_args(tp)
        items = value if isinstance(value, list) else [] if value is None else [value]
        return [_coerce(vt, v, f"{where}[{i}]") for i, v in enumerate(items)]
    if origin is tuple:
        return tuple(_coerce(t, v, where) for t, v in zip(typing.get_args(tp), value, strict=True))
    if tp is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str | int | float):
        return str(value)
    if tp in (int, bool):
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value
