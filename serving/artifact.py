"""The export artifact: everything the server needs, loadable without TorchRec sharding.

Layout of ``runs/<name>/export/`` (format 2)::

    config.json          {"format": 2, "num_items": N, "embedding_dim": d, "model": {ModelConfig fields},
                          "exclude_seen": "history" | "window"}  (the run's data.exclude_seen; "history" if absent)
    metadata.json        {"version": "...", "metrics": {...}, "created_at": "...", ...}
    encoder.pt           the encoder's state dict (dense weights), plain tensors
    item_embeddings.pt   [N + 1, d] float tensor, row 0 the padding row
    items.parquet        item_id (dense 1..N), raw_item (string), title (string or null)
    histories/           the known users' histories, memory-mapped by the server (``serving.histories``)

Tensors are written with ``torch.save`` and read with ``torch.load(weights_only=True)``, so loading
an artifact runs no pickled code. The directory is written next to its destination and renamed into
place, so a reader never sees half an export.

Example::

    >>> save_artifact("runs/x/export", model_config=cfg, encoder_state=model.encoder.state_dict(),
    ...               item_embeddings=table, items=items_df, users=users_df,
    ...               metadata={"version": "hstu-ml1m-2026-11-28", "metrics": {"ndcg@10": 0.18}})
    >>> art = load_artifact("runs/x/export")
    >>> art.num_items, art.version
    (3706, 'hstu-ml1m-2026-11-28')
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from data.splits import SeenItems
from serving.histories import HistoryStore, UserHistories

FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
ENCODER_FILE = "encoder.pt"
ITEM_EMBEDDINGS_FILE = "item_embeddings.pt"
ITEMS_FILE = "items.parquet"
HISTORIES_DIR = "histories"

ITEM_COLUMNS = ("item_id", "raw_item", "title")
USER_COLUMNS = ("user_id", "item_ids", "timestamps")


@dataclass
class Artifact:
    """A loaded export.

    Attributes:
        model_config: the ``ModelConfig`` fields as JSON values (enums as their values).
        encoder_state: the encoder's state dict.
        item_embeddings: [num_items + 1, d] float32, row 0 padding.
        items: one row per item: ``item_id`` (dense, 1..num_items, in order), ``raw_item``, ``title``.
        histories: the known users' histories (dense item ids), memory-mapped.
        metadata: at least ``version``; ``metrics`` and whatever training recorded.
        path: where it was loaded from (None when built in memory).
        exclude_seen: which of a user's items the run counted as seen (``data.splits.SeenItems``): the
            server's default, so that served lists follow the rule the run was evaluated with.
    """

    model_config: dict[str, Any]
    encoder_state: dict[str, torch.Tensor]
    item_embeddings: torch.Tensor
    items: pd.DataFrame
    histories: HistoryStore
    metadata: dict[str, Any]
    path: Path | None = None
    exclude_seen: SeenItems = SeenItems.HISTORY

    @property
    def version(self) -> str:
        return str(self.metadata["version"])

    @property
    def num_items(self) -> int:
        return self.item_embeddings.shape[0] - 1

    @property
    def embedding_dim(self) -> int:
        return self.item_embeddings.shape[1]


def save_artifact(
    path: str | Path,
    *,
    model_config: Any,
    encoder_state: Mapping[str, torch.Tensor],
    item_embeddings: torch.Tensor,
    items: pd.DataFrame,
    users: pd.DataFrame | UserHistories,
    metadata: Mapping[str, Any],
    exclude_seen: SeenItems = SeenItems.HISTORY,
) -> Path:
    """Writes an export atomically (temp dir + rename) and returns its path.

    Args:
        path: the export directory; replaced if it exists.
        model_config: the ``models.config.ModelConfig`` (or its fields as a dict).
        encoder_state: ``model.encoder.state_dict()``; tensors are detached and moved to the CPU.
        item_embeddings: [num_items + 1, d] float rows of the item table (row 0 padding).
        items: columns ``item_id`` (dense 1..num_items, each once), ``raw_item``, optional ``title``.
        users: the known users' histories: ``UserHistories`` (dense item ids, as training holds them), or a
            table with columns ``user_id``, ``item_ids`` (raw ids, oldest first), ``timestamps`` (seconds).
        metadata: must hold ``version`` (a non-empty string); ``metrics`` by convention.
        exclude_seen: the run's seen-items rule (``Artifact.exclude_seen``).
    """
    path = Path(path)
    table = item_embeddings.detach().to("cpu", torch.float32).contiguous()
    if table.dim() != 2 or table.shape[0] < 2:
        raise ValueError(f"item_embeddings must be [num_items + 1, d]; got {tuple(table.shape)}")
    if not torch.isfinite(table).all():
        raise ValueError("item_embeddings holds NaN or infinite values")
    meta = dict(metadata)
    if not isinstance(meta.get("version"), str) or not meta["version"]:
        raise ValueError("metadata['version'] must be a non-empty string")
    meta.setdefault("metrics", {})
    meta.setdefault("created_at", dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    items_df = _check_items(items, table.shape[0] - 1)
    histories = users if isinstance(users, UserHistories) else _check_users(users, items_df["raw_item"])
    histories.check(table.shape[0] - 1)
    model_json = _to_json(model_config)
    if model_json.get("embedding_dim", table.shape[1]) != table.shape[1]:
        raise ValueError(f"item_embeddings has {table.shape[1]} columns but the model's embedding_dim is "
                         f"{model_json['embedding_dim']}; export the model's rows (embed_items), not the raw table")
    config = {
        "format": FORMAT_VERSION,
        "num_items": table.shape[0] - 1,
        "embedding_dim": table.shape[1],
        "model": model_json,
        "exclude_seen": SeenItems(exclude_seen).value,
    }
    state = {k: v.detach().to("cpu").contiguous() for k, v in encoder_state.items()}

    # Write beside the destination (same filesystem) so the final rename is atomic.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / METADATA_FILE).write_text(json.dumps(_to_json(meta), indent=2) + "\n")
        torch.save(state, tmp / ENCODER_FILE)
        torch.save(table, tmp / ITEM_EMBEDDINGS_FILE)
        items_df.to_parquet(tmp / ITEMS_FILE, index=False)
        HistoryStore.write(tmp / HISTORIES_DIR, histories)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_artifact(path: str | Path) -> Artifact:
    """Reads an export written by ``save_artifact``; raises ``FileNotFoundError``/``ValueError`` if
    it is missing or of another format."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no export at {path} (missing {CONFIG_FILE}); train one with `make train`")
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: export format {config.get('format')!r}, this server reads {FORMAT_VERSION}")
    table = torch.load(path / ITEM_EMBEDDINGS_FILE, weights_only=True, map_location="cpu")
    if tuple(table.shape) != (config["num_items"] + 1, config["embedding_dim"]):
        raise ValueError(f"{path}: item_embeddings is {tuple(table.shape)}, config says "
                         f"({config['num_items'] + 1}, {config['embedding_dim']})")
    items = pd.read_parquet(path / ITEMS_FILE)
    items["raw_item"] = items["raw_item"].astype(str)
    return Artifact(
        model_config=config["model"],
        encoder_state=torch.load(path / ENCODER_FILE, weights_only=True, map_location="cpu"),
        item_embeddings=table,
        items=items,
        histories=HistoryStore.open(path / HISTORIES_DIR),
        metadata=json.loads((path / METADATA_FILE).read_text()),
        path=path,
        exclude_seen=SeenItems(config.get("exclude_seen", SeenItems.HISTORY)),
    )


# --- helpers -------------------------------------------------------------------------------------
def _check_items(items: pd.DataFrame, num_items: int) -> pd.DataFrame:
    missing = {"item_id", "raw_item"} - set(items.columns)
    if missing:
        raise ValueError(f"items table lacks columns {sorted(missing)}")
    df = pd.DataFrame({
        "item_id": items["item_id"].astype("int64"),
        "raw_item": items["raw_item"].astype(str),
        "title": items["title"].astype("string") if "title" in items.columns else pd.NA,
    }).sort_values("item_id", ignore_index=True)
    # Every dense row 1..N needs its raw id, or the server could return an item it cannot name.
    if df["item_id"].tolist() != list(range(1, num_items + 1)):
        raise ValueError(f"items.item_id must be 1..{num_items} (the embedding rows), each once")
    if df["raw_item"].duplicated().any():
        raise ValueError("items.raw_item has duplicates")
    return df.astype({"title": "string"})


def _check_users(users: pd.DataFrame, raw_items: pd.Series) -> UserHistories:
    """A users table of raw ids as ``UserHistories`` of dense ones, checked in bulk (one pass of Arrow
    compute over all events, not a Python loop over them)."""
    missing = set(USER_COLUMNS) - set(users.columns)
    if missing:
        raise ValueError(f"users table lacks columns {sorted(missing)}")
    user_ids = users["user_id"].astype(str)
    if user_ids.duplicated().any():
        raise ValueError("users.user_id has duplicates")
    items, stamps = _lists(users["item_ids"], pa.string()), _lists(users["timestamps"], pa.int64())
    uneven = np.flatnonzero(pc.list_value_length(items).to_numpy(zero_copy_only=False)
                            != pc.list_value_length(stamps).to_numpy(zero_copy_only=False))
    if uneven.size:
        row = int(uneven[0])
        raise ValueError(f"user {user_ids.iloc[row]!r}: {len(items[row])} items but {len(stamps[row])} timestamps")
    index = pc.index_in(items.flatten(), value_set=pa.array(raw_items.to_numpy(), pa.string()))
    known = index.is_valid().to_numpy(zero_copy_only=False)
    if not known.all():
        event = int(np.argmin(known))
        row = int(np.searchsorted(items.offsets.to_numpy(), event, side="right") - 1)
        raise ValueError(f"user {user_ids.iloc[row]!r}: history item {items.flatten()[event].as_py()!r} is not in "
                         "the items table")
    # raw_items is the items table sorted by item_id: position p is dense id p + 1.
    return UserHistories(user_ids.to_numpy(dtype=str), items.offsets.to_numpy().astype(np.int64),
                         index.to_numpy().astype(np.int64) + 1, stamps.flatten().to_numpy().astype(np.int64))


def _lists(column: pd.Series, value_type: pa.DataType) -> pa.ListArray:
    """A column of sequences (lists or arrays) as an Arrow list array of ``value_type`` (ints become strings)."""
    if not len(column):
        return pa.array([], pa.list_(value_type))
    try:
        return pa.array(column.to_list(), from_pandas=True).cast(pa.list_(value_type))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):  # mixed types: one by one
        convert = str if value_type == pa.string() else int
        return pa.array([[convert(x) for x in seq] for seq in column], pa.list_(value_type))


def _to_json(value: Any) -> Any:
    """Dataclasses, enums, tuples and paths as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy and 0-d torch scalars
        return value.item()
    return value


def _replace_dir(src: Path, dst: Path) -> None:
    """Moves ``src`` to ``dst``. POSIX cannot rename over a non-empty directory, so an existing export
    is first renamed aside; a reader sees the old export or the new one, never a mix."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
