"""The model card `diffalign export` writes beside an exported pipeline: a `README.md` in the Hugging Face
Hub's format (YAML metadata, then markdown), so the folder can be published as it is. It says what the
model is (the base, the method and its paper, the reward), how it scored in the run's own evaluation
against its base, how it was trained (the sampler, the adapter, the budget, the full config) and how to
load it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def _num(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def evaluation_table(summary: dict) -> str:
    """The run's base-vs-aligned numbers (summary.json), as a markdown table; rows the run lacks are left out."""
    base, final = summary.get("base") or {}, summary.get("final") or {}
    rows = [("training reward (mean)", summary.get("base_reward_mean"), summary.get("final_reward_mean")),
            ("held-out reward (mean)", summary.get("base_eval_reward_mean"), summary.get("final_eval_reward_mean")),
            ("win rate vs the base, training reward", None, summary.get("win_rate_vs_base")),
            ("win rate vs the base, held-out reward", None, summary.get("eval_win_rate_vs_base")),
            ("diversity (relative to the base)", 1.0 if final.get("diversity_rel") is not None else None,
             final.get("diversity_rel")),
            ("Fréchet distance to real data", base.get("frechet"), final.get("frechet")),
            ("path KL to the base (nats)", None, summary.get("kl"))]
    lines = ["| metric | base | aligned |", "|---|---:|---:|"]
    lines += [f"| {name} | {_num(b)} | {_num(a)} |" for name, b, a in rows if a is not None]
    n = final.get("n")
    note = f"\n\n{n} samples per model on the same fixed noise (`diffalign eval`)." if n else ""
    return "\n".join(lines) + note


def model_card(loaded, run_dir, out, pipeline: str, component: str, lora: bool, merged: bool,
               base_model: str | None = None) -> str:
    """The card's text for the run `loaded` (from `eval.run.load_run`) in `run_dir`, exported to `out`."""
    from .config import dump_config
    from .flow import is_flow
    from .methods import get_method

    cfg = loaded.cfg
    run_dir, out = Path(run_dir), Path(out)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    method = get_method(cfg.method)
    base = base_model or Path(str(cfg.model)).name
    reward = cfg.reward if isinstance(cfg.reward, str) else json.dumps(cfg.reward)
    tags = ["diffalign", cfg.method, "text-to-image", "diffusers", "reward-fine-tuning"] + (["lora"] if lora else [])
    meta = {"base_model": base, "library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": tags}
    weights = ("LoRA (rank {r}, alpha {a}) on {t}, {how}".format(
        r=cfg.lora.rank, a=cfg.lora.alpha, t=", ".join(cfg.lora.targets or ["the model's default targets"]),
        how="fused into the weights" if merged else "in `pytorch_lora_weights.safetensors` beside the pipeline")
               if lora else f"full fine-tune of the {component}")
    s = cfg.sampling
    sampler = getattr(loaded, "sampler", None)
    guidance = getattr(sampler, "guidance_scale", None) or s.guidance_scale
    flow = is_flow(loaded.run.model.scheduler)
    load = (f"pipe = {pipeline}.from_pretrained(\"{out.name}\")"
            + ("" if merged or not lora else f"\npipe.load_lora_weights(\"{out.name}\")"))
    config = dump_config(cfg)
    budget = [f"{summary['reward_queries']} reward queries" if "reward_queries" in summary else None,
              f"{summary['epochs']} epochs" if "epochs" in summary else None,
              f"{summary['wall_s']:.0f} s of training" if isinstance(summary.get("wall_s"), (int, float)) else None,
              f"{summary['processes']} process(es)" if "processes" in summary else None]
    text = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {out.name}", "",
        f"`{base}` aligned with **{cfg.method}** ({method.description}) against the reward `{reward}`, "
        "with diffalign. The base model's licence applies to these weights.", "",
        "## Evaluation", "",
        evaluation_table(summary) if summary else "The run has no summary.json (it did not finish).", "",
        "## How it was trained", "",
        f"- weights: {weights}",
        f"- sampler: {s.num_steps} steps, eta {s.eta}, guidance {guidance}" + (f", SDE `{s.sde}`" if flow else ""),
        f"- optimiser: lr {cfg.optim.lr}, {cfg.train.batch_size} samples per batch x {cfg.train.batches_per_epoch} "
        f"per epoch",
        "- budget: " + ", ".join(b for b in budget if b), "",
        "The full config of the run (`diffalign train CONFIG` reproduces it):", "",
        "```yaml", config.strip(), "```", "",
        "## Use", "",
        "```python", f"from diffusers import {pipeline}", "", load,
        "image = pipe(\"a photo of a cat\").images[0]", "```", "",
        f"Exported with `diffalign export {run_dir} --out {out}{' --merge' if merged else ''}`.", ""]
    return "\n".join(text)

