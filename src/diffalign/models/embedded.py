"""What the embedded models (digits, toy2d and their flow variants) share: pretraining on first
use, the cache, and reading a saved folder.

An embedded model is one network class and its data; an `Embedded` names what differs
between them (the network, its training batches, how a loaded network becomes a
`DiffusionModel`), and does the rest the same way for each:

- `pretrain(out, config)`: seeds, builds the network and the scheduler (`pretraining.make_scheduler`),
  trains it with `pretraining.denoising_pretrain` and saves `<out>/<weights>` and `<out>/scheduler`.
- `load_cached(name, config)`: the cache folder `cached_dir(name, config, ...)`, pretrained on first use.
- `from_folder(path)`: a saved folder (e.g. a user's own fine-tune), every missing file named.
- `register(name, description, config, ...)`: a registered loader for one configuration.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..cache import cached_dir
from . import register_model
from .base import DiffusionModel
from .pretraining import denoising_pretrain, load_folder, load_scheduler, make_scheduler


@contextlib.contextmanager
def threads(n: int):
    """At most `n` intra-op threads inside the block (never more than were set), restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, old)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class Embedded:
    """One embedded model family: its network and data; the loaders are the same for each."""

    kind: str  # what the messages call it: "digits"
    weights: str  # the network's subfolder: "unet"
    net_class: type  # a diffusers ModelMixin, read with from_pretrained
    make_net: Callable[[dict], torch.nn.Module]  # config -> a freshly initialised network
    make_batch: Callable[[dict], Callable]  # config -> batch(generator) -> (x0, cond)
    forward: Callable  # forward(net, x, t, cond) -> the network's output
    build: Callable[..., DiffusionModel]  # build(folder, net, scheduler, name) -> the model
    check: Callable[[torch.nn.Module], str | None] = lambda net: None  # what is wrong with a loaded network

    def pretrain(self, out_dir, config: dict, progress: bool = True) -> dict:
        """Train the network from scratch and save it to `out_dir` (EMA weights and the scheduler).
        Deterministic for a given config (seeded init, batches, noise); returns stats."""
        out_dir = Path(out_dir)
        with threads(config["threads"]):
            torch.manual_seed(config["seed"])
            gen = torch.Generator().manual_seed(config["seed"])
            net = self.make_net(config)
            scheduler = make_scheduler(config)
            stats = denoising_pretrain(net, scheduler, config, self.make_batch(config), self.forward, gen,
                                       out_dir / self.weights, f"pretraining {self.kind} (first use only)", progress)
            scheduler.save_pretrained(out_dir / "scheduler")
        return stats

    def load(self, folder: Path, fix: str, name: str) -> DiffusionModel:
        """The model saved in `folder`; every failure names the folder and `fix`."""

        def read(folder):
            return (self.net_class.from_pretrained(folder / self.weights, use_safetensors=True),
                    load_scheduler(folder / "scheduler"))

        net, scheduler = load_folder(name, folder, self.required_files(), fix, read)
        problem = self.check(net)
        if problem:
            raise RuntimeError(f"{str(folder)!r} is not a {self.kind} model ({problem}); {fix}")
        return self.build(folder, net, scheduler, name)

    def required_files(self) -> tuple[str, ...]:
        return (f"{self.weights}/config.json", f"{self.weights}/diffusion_pytorch_model.safetensors",
                "scheduler/scheduler_config.json")

    def from_folder(self, path) -> DiffusionModel:
        """A model saved as `<path>/<weights>` + `<path>/scheduler` (e.g. your own fine-tune)."""
        fix = (f"pass a folder holding '{self.weights}/' ({self.net_class.__name__}.save_pretrained) and "
               "'scheduler/' (DDIMScheduler or FlowMatchEulerDiscreteScheduler .save_pretrained), or use load() "
               "for the embedded pretrained model")
        return self.load(Path(path).expanduser(), fix, self.kind)

    def load_cached(self, name: str, config: dict, progress: bool = True) -> DiffusionModel:
        """The model `name` pretrained with `config`, from the cache (pretrained and cached on first use)."""
        folder = cached_dir(name, config, lambda p: self.pretrain(p, config, progress=progress))
        fix = f"the cache entry looks corrupt: delete the folder {str(folder)!r} and load {name!r} again to re-pretrain"
        return self.load(folder, fix, name)

    def register(self, name: str, description: str, config: dict, reward: str | None = None,
                 eval_reward: str | None = None) -> Callable[..., DiffusionModel]:
        """Register `name` as this family pretrained with `config` (the cache key: name and config);
        `reward` and `eval_reward` are the config defaults for runs on it. Returns the loader."""

        def load(progress: bool = True) -> DiffusionModel:
            return self.load_cached(name, config, progress)

        load.__doc__ = f"The embedded {name} model, pretrained and cached on first use."
        return register_model(name, description, reward=reward, eval_reward=eval_reward)(load)
