"""Where pretrained embedded models and reward networks are cached.

`$DIFFALIGN_CACHE` if set, else `$XDG_CACHE_HOME/diffalign`, else `~/.cache/diffalign`.
Entries are folders keyed by a hash of the config that produced them, written
atomically (built in a temporary sibling folder, then renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    env = os.environ.get("DIFFALIGN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "diffalign"


def config_key(config: dict) -> str:
    """Short stable hash of a JSON-serialisable config."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def cached_dir(kind: str, config: dict, build: Callable[[Path], None]) -> Path:
    """Return `<root>/<kind>-<hash>`, calling `build(tmp_dir)` first if it is missing.

    `build` writes everything into the folder it is given; the folder only
    appears under its final name once `build` returned, so a crash mid-build
    never leaves a half-written cache entry.
    """
    root = cache_root()
    final = root / f"{kind}-{config_key(config)}"
    if (final / "DONE").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
    try:
        build(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        (tmp / "DONE").write_text("ok\n")
        if final.exists():  # an incomplete leftover, or another process won the race
            if (final / "DONE").exists():
                return final
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
