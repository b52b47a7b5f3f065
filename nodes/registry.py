"""The catalog of node kinds. A kind registers itself with `@register`; dropping one module into
nodes/plugins/, nodes/filters/ or nodes/fans/ is all it takes to add one.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from typing import TypeVar

from .base import Backend

_KINDS: dict[str, type[Backend]] = {}
_PACKAGES = ("nodes.plugins", "nodes.filters", "nodes.fans")
_loaded = False

B = TypeVar("B", bound=type[Backend])


def register(cls: B) -> B:
    if not cls.kind:
        raise TypeError(f"{cls.__name__} has no kind name")
    if cls.kind in _KINDS and _KINDS[cls.kind] is not cls:
        raise TypeError(f"kind {cls.kind!r} registered twice")
    _KINDS[cls.kind] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for package_name in _PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")
    _loaded = True


def kinds() -> dict[str, type[Backend]]:
    _load_all()
    return dict(sorted(_KINDS.items()))


class _Catalog(Mapping[str, type[Backend]]):
    """Every kind, each imported when it is looked up: checking a topology that names three
    kinds builds three params models, not some hundred (half a second of every CLI command
    and of the orchestrator's start). Listing it imports them all."""

    def __getitem__(self, kind: str) -> type[Backend]:
        return get(kind)

    def __iter__(self) -> Iterator[str]:
        return iter(kinds())

    def __len__(self) -> int:
        return len(kinds())


def catalog() -> Mapping[str, type[Backend]]:
    """The kinds by name, imported as they are looked up (see _Catalog)."""
    return _Catalog()


class UnknownKind(KeyError):
    def __str__(self) -> str:
        from .params import did_you_mean

        hint = did_you_mean(str(self.args[0]), _KINDS)
        return f"unknown node kind {self.args[0]!r}{hint} (see `nbdfabric kinds`)"


def _load_one(kind: str) -> None:
    """Import the module of `kind` alone (every kind lives in the module named after it): a
    node starts without building the params models of some fifty kinds it will not serve."""
    module = kind.replace("-", "_")
    if not module.isidentifier() or module.startswith("_"):
        return
    for package_name in _PACKAGES:
        try:
            importlib.import_module(f"{package_name}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{package_name}.{module}":
                raise  # the module exists and lacks something: say so, not "unknown kind"
            continue
        return


def get(kind: str) -> type[Backend]:
    if kind not in _KINDS:
        _load_one(kind)
    if kind not in _KINDS:
        _load_all()  # a kind in a module of another name, or none: the hint needs them all
    try:
        return _KINDS[kind]
    except KeyError:
        raise UnknownKind(kind) from None


def summary(cls: type[Backend]) -> str:
    """The first line of a kind's docstring: its one-line description."""
    return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
