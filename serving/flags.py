"""A command line generated from a config dataclass: one flag per field, named, typed, defaulted and
documented by the field itself (its entry in the class docstring's ``Attributes:``), so a setting is
written once. Nested dataclass fields (``ServerConfig.batcher``) contribute their own fields' flags.

Types: int, float, str, Path, an Enum (its values as choices), ``X | None`` (default None), and bool
(``--name`` when the default is False, ``--no-name`` when it is True). A field may name its flag
(``field(metadata={"flag": "index-nprobe"})``), e.g. to keep a nested config's flags apart.

Example::

    >>> @dataclass
    ... class Config:
    ...     '''Attributes:
    ...         port: 0 picks a free port.
    ...         cache: keep results.
    ...     '''
    ...     port: int = 80
    ...     cache: bool = True
    >>> parse(Config, ["--port", "0", "--no-cache"])
    Config(port=0, cache=False)
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass  # noqa: F401 (the example)
from typing import Any, TypeVar

T = TypeVar("T")


def attribute_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` entries of a class docstring, one line each (``a, b: text`` documents both)."""
    doc = (cls.__doc__ or "").split("Attributes:", 1)
    if len(doc) < 2:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    for line in doc[1].splitlines():
        entry = re.match(r"^\s{4,8}([a-z_][\w, ]*):\s*(.*)$", line)
        if entry and all(n.strip().isidentifier() for n in entry.group(1).split(",")):
            names = [n.strip() for n in entry.group(1).split(",")]
            for n in names:
                out[n] = entry.group(2)
        elif line.strip() and names:
            for n in names:
                out[n] += " " + line.strip()
        elif not line.strip():
            names = []
    return out


def _flag_type(hint: Any) -> tuple[Any, bool]:
    """(the type argparse converts to, whether None is allowed)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return (str if str in rest else rest[0]), type(None) in args
    return hint, False


def _dest(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", f.name).replace("-", "_")


def _leaves(cls: type, defaults: Any) -> list[tuple[str, Any, Any, str]]:
    """(dest, type hint, default, help) of every flag of ``cls``, nested dataclasses' fields included."""
    hints, docs = typing.get_type_hints(cls), attribute_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint, default = hints[f.name], getattr(defaults, f.name)
        if dataclasses.is_dataclass(hint):
            out += _leaves(hint, default)
        else:
            # Its first sentence (the docstring has the rest); argparse formats help with %.
            text = re.split(r"(?<=\.)\s", docs.get(f.name, ""), maxsplit=1)[0]
            out.append((_dest(f), hint, default, text.replace("%", "%%")))
    return out


def parser(cls: type, defaults: Any, **kwargs: Any) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with one flag per leaf field of ``cls``, defaulting to ``defaults``' values."""
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)
    for name, hint, default, text in _leaves(cls, defaults):
        flag = "--" + name.replace("_", "-")
        kind, _ = _flag_type(hint)
        if kind is bool:
            if default:
                p.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false", help=text)
            else:
                p.add_argument(flag, dest=name, action="store_true", help=text)
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            p.add_argument(flag, dest=name, choices=[e.value for e in kind],
                           default=None if default is None else kind(default).value, help=text)
        else:
            p.add_argument(flag, dest=name, type=kind, default=default, help=text,
                           metavar=name.upper())
    return p


def from_namespace(cls: type[T], namespace: argparse.Namespace) -> T:
    """The ``cls`` instance that ``parser(cls, ...)``'s parsed flags describe."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            values[f.name] = from_namespace(hint, namespace)
            continue
        value = getattr(namespace, _dest(f))
        kind, _ = _flag_type(hint)
        if value is not None and isinstance(kind, type) and issubclass(kind, enum.Enum):
            value = kind(value)
        values[f.name] = value
    return cls(**values)


def parse(cls: type[T], argv: Sequence[str] | None = None, defaults: Any = None, **kwargs: Any) -> T:
    """Parses ``argv`` into a ``cls``; ``defaults`` (an instance) gives the flags' defaults."""
    defaults = defaults if defaults is not None else cls()
    return from_namespace(cls, parser(cls, defaults, **kwargs).parse_args(argv))

