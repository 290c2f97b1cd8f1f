"""Which deflate library inflates ZIP deflate entries and gzip streams: zlib-ng where it is installed,
the standard library's zlib otherwise.

zlib-ng (the ``zlib-ng`` package, module ``zlib_ng.zlib_ng``) has the standard module's interface
(``decompressobj`` with ``max_length``, ``unconsumed_tail``, ``unused_data``, ``eof``; ``crc32``), so the
worker's guards (``worker._pump`` and ``_Meter``) are the same code for both; only the speed differs
(per core on GH-like NDJSON: BENCH_NOTES.md, issue 14; ``loadtest/bench_limit.py`` measures it).

The choice is the ``--inflater`` setting (``auto``, ``zlib-ng`` or ``zlib``) and travels with each job by
name (``Job.inflater``), so the tests run every guard with each backend through that one parameter.
"""

from __future__ import annotations

import functools
import importlib
import zlib
from enum import StrEnum
from types import ModuleType

__all__ = ["AUTO", "Inflater", "available", "errors", "library", "resolve"]

AUTO = "auto"


class Inflater(StrEnum):
    ZLIB_NG = "zlib-ng"
    ZLIB = "zlib"


_MODULES = {Inflater.ZLIB_NG: "zlib_ng.zlib_ng", Inflater.ZLIB: "zlib"}


def _load(name: Inflater) -> ModuleType | None:
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError:
        return None


_LOADED: dict[Inflater, ModuleType] = {
    name: module for name in Inflater if (module := _load(name)) is not None
}


def available() -> tuple[Inflater, ...]:
    """The backends this interpreter can import, fastest first."""
    return tuple(name for name in Inflater if name in _LOADED)


def resolve(choice: str) -> Inflater:
    """The backend ``choice`` names (``auto``: the fastest available). ValueError when it is not
    installed or not a backend at all: a setting that asks for zlib-ng must not quietly run zlib."""
    if choice == AUTO:
        return available()[0]
    try:
        name = Inflater(choice)
    except ValueError:
        raise ValueError(f"must be {AUTO}, {' or '.join(Inflater)}") from None
    if name not in _LOADED:
        raise ValueError(
            f"needs the {name} package, which is not installed here; use {AUTO} or {Inflater.ZLIB}"
        )
    return name


@functools.cache  # asked once per ZIP entry: run_job on files400.zip 8.3 -> 7.5 ms of CPU
def library(choice: str) -> ModuleType:
    """The module of the backend ``choice`` names (``decompressobj``, ``crc32``, ``error``, ``MAX_WBITS``)."""
    return _LOADED[resolve(choice)]


def errors() -> tuple[type[Exception], ...]:
    """What the loaded backends raise for corrupt data (zlib-ng's ``error`` is not zlib's)."""
    return tuple({module.error for module in _LOADED.values()} | {zlib.error})
