"""The server's command line is generated from ``ServerConfig``: every field is a flag, documented, and
parses back into the same config."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from data.splits import SeenItems
from serving import flags
from serving.batcher import BatcherConfig
from serving.index import IndexConfig, IndexKind
from serving.server import ServerConfig, parse_args


def _fields(cls: type) -> list[str]:
    """Every leaf field's flag destination (its name, or the flag it names, with _ for -)."""
    hints = typing.get_type_hints(cls)
    return [n for f in dataclasses.fields(cls)
            for n in (_fields(hints[f.name]) if dataclasses.is_dataclass(hints[f.name])
                      else [f.metadata.get("flag", f.name).replace("-", "_")])]


def test_every_field_is_a_documented_flag() -> None:
    parser = flags.parser(ServerConfig, ServerConfig(artifact=Path("x")))
    by_dest = {a.dest: a for a in parser._actions}
    for name in _fields(ServerConfig):
        assert name in by_dest, f"ServerConfig.{name} has no flag"
        assert by_dest[name].help, f"ServerConfig.{name} has no entry under Attributes: in its docstring"


def test_no_flags_give_the_dataclass_defaults() -> None:
    assert parse_args([]) == ServerConfig(artifact=Path("runs/latest/export"))


def test_flags_parse_into_the_config() -> None:
    config = parse_args(["--artifact", "a/export", "--port", "0", "--max-batch-size", "8", "--max-queue-delay-ms",
                         "0.5", "--no-append-events", "--cuda-graphs", "--exclude-seen", "window",
                         "--metrics-port", "9100", "--appended-events", ":memory:", "--tls-cert", "c.pem"])
    assert config.artifact == Path("a/export") and config.port == 0 and config.metrics_port == 9100
    assert config.batcher == BatcherConfig(max_batch_size=8, max_queue_delay_ms=0.5)
    assert config.append_events is False and config.cuda_graphs is True
    assert config.exclude_seen is SeenItems.WINDOW
    assert config.appended_events == ":memory:" and config.tls_cert == Path("c.pem")


def test_a_nested_config_names_its_own_flags() -> None:
    config = parse_args(["--index", "ivf", "--index-nprobe", "64", "--hnsw-m", "16"])
    assert config.index == IndexConfig(IndexKind.IVF, nprobe=64, hnsw_m=16)


def test_a_bad_value_is_refused_by_the_parser(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--max-batch-size", "many"])
    assert "--max-batch-size: invalid int value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--exclude-seen", "all"])
