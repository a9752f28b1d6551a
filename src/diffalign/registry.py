"""What the registries (methods, models, rewards) share: finding their files."""

from __future__ import annotations

import importlib
import pkgutil


def import_all(package: str, path) -> None:
    """Import every module of `package` (its `__path__`) whose name does not start with '_', so
    that their `@register...` decorators run: a new entry is one new file."""
    for info in pkgutil.iter_modules(path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
