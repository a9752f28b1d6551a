"""A run's aligned denoiser as a diffusers pipeline folder: `diffalign export RUN --out DIR [--merge]`.

- LoRA run, no `--merge`: the base pipeline folder copied, with the run's
  `pytorch_lora_weights.safetensors` beside `model_index.json`:
  `StableDiffusionPipeline.from_pretrained(DIR).load_lora_weights(DIR)`.
- LoRA run, `--merge`: diffusers loads the base, applies the LoRA
  (`load_lora_weights`), fuses it into the UNet (`fuse_lora`) and saves the pipeline:
  `from_pretrained(DIR)` alone gives the aligned model.
- full fine-tune: the base folder with the run's UNet in place of its own (what a
  finished run's `final/` already holds).

Each export holds a model card, `README.md` in the Hub's format (`diffalign.model_card`).

Only pipeline-folder models export (the embedded models keep their weights in
`RUN/final`); a method that does not train the denoiser (DDO: its aligned model is the
base plus a learned sampler correction) has nothing to export as a pipeline.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

from . import adapters
from .checkpoint import atomic_dir


def copy_pipeline(base: str | Path, dest: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy a pipeline folder's files and subfolders into the existing `dest`, except `skip`."""
    base = Path(base)
    for entry in base.iterdir():
        if entry.name in skip or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dest / entry.name)
        else:
            shutil.copy2(entry, dest / entry.name)


def write_pipeline(base: str | Path, dest: Path, denoiser, component: str = "unet") -> None:
    """A complete pipeline folder in `dest`: `base` with `denoiser` in place of its `component`."""
    copy_pipeline(base, dest, skip=(component, adapters.LORA_FILE))
    denoiser.save_pretrained(dest / component, safe_serialization=True)


def component(model) -> str:
    """The denoiser's subfolder in its pipeline, also its LoRA key prefix: 'unet', or 'transformer' (SD3)."""
    return model.pipeline.component if model.pipeline else "unet"


def pipeline_folder(model) -> Path | None:
    """The diffusers pipeline folder `model` was loaded from (one with model_index.json), else None."""
    folder = Path(model.path) if model.path else None
    return folder if folder is not None and (folder / "model_index.json").is_file() else None


def pipeline_class(folder: str | Path):
    import diffusers

    name = json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"{folder}: diffusers has no pipeline class {name!r}")
    return cls


def export_run(run_dir: str | Path, out: str | Path, merge: bool = False, base_model: str | None = None) -> Path:
    """Write the newest weights of the run in `run_dir` as a pipeline folder `out` (atomically), with a model
    card (`README.md`, `diffalign.model_card`; `base_model`: the base's Hub id for its metadata, default the
    base folder's name)."""
    from .model_card import model_card

    from .eval.run import load_run

    loaded = load_run(run_dir)
    run, base = loaded.run, pipeline_folder(loaded.run.model)
    if base is None:
        raise ValueError(f"{run_dir}: its model {loaded.cfg.model!r} is not a diffusers pipeline folder, so there is no "
                         "pipeline to export; its weights are in RUN/final (unet/ or the LoRA file)")
    if not _trains_denoiser(loaded):
        raise ValueError(f"{run_dir}: method {loaded.cfg.method!r} does not train the denoiser (its aligned model is the "
                         "base with its own sampler), so a pipeline folder would be the base unchanged")
    if getattr(loaded.sampler, "correction", None) is not None or getattr(loaded.sampler, "transition", None) is not None:
        warnings.warn(f"method {loaded.cfg.method!r} samples with its own score correction; the exported pipeline "
                      "holds the weights only and samples without it", stacklevel=2)
    den = adapters.unwrap(run.model.denoiser)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose a new --out folder")
    with atomic_dir(out) as tmp:
        if run.lora_config is None:
            if merge:
                warnings.warn("--merge has no effect on a full fine-tune", stacklevel=2)
            write_pipeline(base, tmp, den, component(run.model))
        elif not merge:
            copy_pipeline(base, tmp, skip=(adapters.LORA_FILE,))
            adapters.write_lora(den, tmp, run.lora_config, component(run.model) + ".")
        else:
            with tempfile.TemporaryDirectory() as lora_dir:
                adapters.write_lora(den, lora_dir, run.lora_config, component(run.model) + ".")
                pipe = pipeline_class(base).from_pretrained(base, local_files_only=True)
                pipe.load_lora_weights(lora_dir)
                pipe.fuse_lora()
                pipe.unload_lora_weights()
                pipe.save_pretrained(tmp, safe_serialization=True)
        card = model_card(loaded, run_dir, out, pipeline_class(base).__name__, component(run.model),
                          lora=run.lora_config is not None, merged=merge and run.lora_config is not None,
                          base_model=base_model)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if loaded.cfg.pipeline.scheduler:  # the run sampled with these settings over the folder's: so does the export
            path = tmp / "scheduler" / "scheduler_config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), **loaded.cfg.pipeline.scheduler}, indent=2))
    return out


def _trains_denoiser(loaded) -> bool:
    from .methods import modules_of

    return "denoiser" in modules_of(loaded.method, loaded.run)
