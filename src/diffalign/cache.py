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


class CachedNetwork:
    """A small network the project trains itself on first use and caches (the digit classifiers, the angle
    judges): `model.safetensors` and the metrics measured when it was trained (`metrics.json`) in the cache
    entry `<kind>-<hash of config>`. `make()` builds a fresh module of its architecture; `train(config)` returns
    (trained module, metrics); `describe(metrics)` is the line printed to stderr after training."""

    def __init__(self, kind: str, config: dict, make: Callable, train: Callable, describe: Callable[[dict], str]):
        self.kind, self.config, self.make, self.train, self.describe = kind, config, make, train, describe
        self._state = None
        self._copies: dict = {}  # device -> the shared frozen copy there

    def path(self) -> Path:
        """The cache entry, trained and written first if it is missing."""
        def build(tmp: Path) -> None:
            import sys

            from safetensors.torch import save_file

            net, metrics = self.train(self.config)
            state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"arch": self.config["arch"]})
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
            print(self.describe(metrics), file=sys.stderr)

        return cached_dir(self.kind, self.config, build)

    def metrics(self) -> dict:
        """What was measured when the network was trained."""
        return json.loads((self.path() / "metrics.json").read_text())

    def load(self, device="cpu"):
        """A new frozen copy in eval mode (changing it changes nothing else)."""
        if self._state is None:
            from safetensors.torch import load_file

            self._state = load_file(str(self.path() / "model.safetensors"), device="cpu")
        net = self.make()
        net.load_state_dict(self._state)
        return net.eval().requires_grad_(False).to(device)

    def on(self, device):
        """The frozen copy shared by every caller on `device`."""
        import torch

        device = torch.device(device)
        if device not in self._copies:
            self._copies[device] = self.load(device)
        return self._copies[device]
