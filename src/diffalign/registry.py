"""What the registries (methods, models, rewards) share: finding their files."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Iterable


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name nearest to a misspelt `name` (difflib's), or None: the "did you mean" of every
    registry and config error."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return close[0] if close else None


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """" Did you mean 'x'?" for the nearest known name, or "" when none is near."""
    close = closest(name, known)
    return f" Did you mean {close!r}?" if close else ""


def import_all(package: str, path) -> None:
    """Import every module of `package` (its `__path__`) whose name does not start with '_', so
    that their `@register...` decorators run: a new entry is one new file."""
    for info in pkgutil.iter_modules(path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
