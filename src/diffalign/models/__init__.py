"""Base models by name: a registry that every model file joins with `@register_model`.

A model file in this package defines a loader `load(progress=True) -> DiffusionModel`
and decorates it; importing the package finds them all, so adding a model is one
new file (see `toy2d.py`; `embedded.py` does the pretraining and caching for models
trained on first use). `load_model(name)` returns a `DiffusionModel` (`models/base.py`).
A registered model may name its default training and held-out rewards, which a config
that leaves `reward` or `eval.reward` at 'default' gets (`model_defaults`).

A name that is a folder path loads a diffusers pipeline folder: its `model_index.json`
names the pipeline class, and the loader registered for that class with
`@register_pipeline` reads it (`sd.py`: Stable Diffusion 1.x/2.x).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..registry import did_you_mean, import_all
from .base import DiffusionModel, EvalSpace, ModelFolderError, PipelineInfo


@dataclass
class ModelEntry:
    name: str
    load: Callable[..., DiffusionModel]  # load(progress=True) -> DiffusionModel
    description: str
    reward: str | None = None  # the training reward a config gets by default (None = it must name one)
    eval_reward: str | None = None  # the held-out evaluation reward a config gets by default (None = none)


MODELS: dict[str, ModelEntry] = {}
PIPELINES: dict[str, Callable[..., DiffusionModel]] = {}  # model_index.json _class_name -> loader(path, **options)
SCHEDULERS: dict[str, Callable] = {}  # model_index.json _class_name -> scheduler loader(folder, overrides)


def register_model(name: str, description: str, reward: str | None = None, eval_reward: str | None = None):
    """Decorator for a loader `load(progress=True) -> DiffusionModel`; `reward` and `eval_reward` are the
    defaults of a config that runs on it."""

    def deco(load: Callable) -> Callable:
        if name in MODELS and MODELS[name].load is not load:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = ModelEntry(name, load, description, reward, eval_reward)
        return load

    return deco


def register_pipeline(class_name: str, scheduler: Callable | None = None):
    """Decorator for a folder loader `load(path, **options) -> DiffusionModel` of one pipeline class;
    `scheduler(folder, overrides)` builds the scheduler that loader uses, without reading weights (so a
    config can be checked against it before anything loads)."""

    def deco(load: Callable) -> Callable:
        PIPELINES[class_name] = load
        if scheduler is not None:
            SCHEDULERS[class_name] = scheduler
        return load

    return deco


def _discover() -> None:
    import_all(__name__, __path__)


def model_names() -> list[str]:
    _discover()
    return sorted(MODELS)


def list_models() -> list[tuple[str, str]]:
    return [(n, MODELS[n].description) for n in model_names()]


def is_path(name: str) -> bool:
    """A model name that means a folder: contains a path separator or starts with '.' or '~'."""
    return "/" in name or "\\" in name or name.startswith((".", "~"))


def load_folder(path: str, **options) -> DiffusionModel:
    """A diffusers pipeline folder, by the class its model_index.json names."""
    import json
    from pathlib import Path

    _discover()
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {str(folder)!r} does not exist: give the path of a diffusers "
                               "pipeline folder (one holding model_index.json), or a model name from `diffalign models`")
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelFolderError(f"{str(folder)!r} has no model_index.json, so it is not a diffusers pipeline folder: "
                               "save one with `pipe.save_pretrained(folder)`")
    kind = json.loads(index.read_text()).get("_class_name", "")
    if kind not in PIPELINES:
        raise ModelFolderError(f"{str(folder)!r} holds a {kind or 'unnamed'} pipeline; diffalign loads "
                               f"{', '.join(sorted(PIPELINES))} folders")
    return PIPELINES[kind](folder, **options)


def folder_scheduler(path: str, overrides: dict | None = None):
    """The scheduler the loader of pipeline folder `path` builds (with `pipeline.scheduler` overrides), or None
    when the folder cannot be read or its class has no scheduler loader (loading it reports why)."""
    import json
    from pathlib import Path

    _discover()
    folder = Path(path).expanduser()
    try:
        kind = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, ValueError):
        return None
    load = SCHEDULERS.get(kind)
    if load is None:
        return None
    try:
        return load(folder, overrides)
    except OSError:  # no scheduler config: loading the folder names every missing part
        return None


def model_entry(name: str) -> ModelEntry:
    """The registry entry of model `name`; an unknown name is an error that lists the known ones."""
    names = model_names()
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(names)}.{did_you_mean(name, names)}")
    return MODELS[name]


def model_defaults(name: str) -> tuple[str | None, str | None]:
    """(training reward, held-out evaluation reward) that model `name` registered as its defaults;
    (None, None) for a pipeline folder, which has none."""
    if is_path(name):
        return None, None
    found = model_entry(name)
    return found.reward, found.eval_reward


def load_model(name: str, device: str | None = None, progress: bool = True, **options) -> DiffusionModel:
    """Load a registered base model (pretraining and caching it on first use), or a pipeline
    folder when `name` is a path (`options`: the loader's, e.g. resolution, negative_prompt)."""
    if is_path(name):
        model = load_folder(name, **options)
        return model.to(device) if device is not None else model
    set_options = {k: v for k, v in options.items() if v not in (None, "", {})}
    if set_options:
        raise ValueError(f"options {sorted(set_options)} apply to pipeline folders only, not to the embedded "
                         f"model {name!r}: remove them from the config's 'pipeline' section")
    model = model_entry(name).load(progress=progress)
    if device is not None:
        model.to(device)
    return model


__all__ = ["DiffusionModel", "EvalSpace", "PipelineInfo", "MODELS", "model_entry", "list_models", "load_model",
           "model_defaults", "model_names", "register_model", "register_pipeline", "is_path", "load_folder",
           "ModelFolderError"]
