"""Evaluation on fixed seeds and prompts, sample grids and reward curves.

A model is measured as a user samples it: the run's weights drawn by a `Sampler`.
Base and final models are measured on identical noise: sample i of the evaluation
set always draws from a generator seeded by (eval seed, i).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch


def eval_set(device, prompts: list[str], per_prompt: int, seed: int, purpose: str = "eval"):
    """Each prompt repeated `per_prompt` times, and one generator per sample seeded by (purpose, seed, i)."""
    from ..seeding import generators

    all_prompts = [p for p in prompts for _ in range(per_prompt)]
    return all_prompts, generators(device, purpose, seed, indices=range(len(all_prompts)))


@contextlib.contextmanager
def eval_mode(model):
    """The denoiser in eval mode inside, back to its previous mode after."""
    was_training = model.denoiser.training
    model.denoiser.eval()
    try:
        yield
    finally:
        model.denoiser.train(was_training)


def base_context(run):
    """Inside, `run.model` is the base model: the reference (adapters off, or the frozen copy);
    a full fine-tune that keeps no copy is the base only before its first update."""
    return run.reference() if run.has_reference else contextlib.nullcontext()


@torch.no_grad()
def sample_eval(model, sampler, prompts: list[str], per_prompt: int, seed: int, batch_size: int = 128,
                purpose: str = "eval"):
    """(decoded samples (N, ...), final samples in model space, prompts) for each prompt repeated
    `per_prompt` times, on fixed noise seeded by (purpose, seed, i)."""
    all_prompts, gens = eval_set(model.device, prompts, per_prompt, seed, purpose)
    images, finals = [], []
    with eval_mode(model):
        for i in range(0, len(all_prompts), batch_size):
            traj = sampler.sample(model, all_prompts[i:i + batch_size], generator=gens[i:i + batch_size],
                                  with_logprob=False)
            finals.append(traj.final)
            images.append(model.decode(traj.final))
    return torch.cat(images), torch.cat(finals), all_prompts


def eval_sampler(sampler, overrides: dict):
    """`sampler` with the `eval.sampling` overrides (config names: `scheduler` is the sampler's `solver`)."""
    if not overrides:
        return sampler
    changes = {("solver" if k == "scheduler" else k): v for k, v in overrides.items()}
    if changes.get("guidance_scale") is not None:
        changes["guidance_scale"] = float(changes["guidance_scale"])
    return sampler.replace(**{k: v for k, v in changes.items() if v is not None or k == "solver"})


def evaluate(run, sampler, grid_path: Path | None = None, label: str = "", per_prompt: int | None = None,
             seed: int | None = None, kl: bool = False) -> dict:
    """Rewards and sample metrics of the model `run.model` sampled by `sampler`, on the run's
    fixed evaluation set.

    Training and held-out reward (mean, std, per sample for win rates), and where the model
    has an evaluation space (`model.eval_space()`): diversity within prompts, Fréchet
    distance to real data, class histogram, and the space's extras (toy2d: the distance to
    the exact optimum). `kl=True` adds the path KL to the reference: `run.reference()`
    sampled by the run's plain sampler (both at eta 1 when `sampler` is deterministic). Both samplers
    take the `eval.sampling` overrides, so every method can be evaluated with one sampler."""
    cfg = run.cfg
    sampler = eval_sampler(sampler, cfg.eval.sampling)
    per_prompt = per_prompt or cfg.eval.per_prompt
    seed = cfg.eval.seed if seed is None else seed
    images, _, prompts = sample_eval(run.model, sampler, run.prompts, per_prompt, seed)
    with torch.no_grad():
        r, info = run.reward(images, prompts)
        result = {"n": len(prompts), "reward_mean": float(r.mean()), "reward_std": float(r.std())}
        result["sample_rewards"] = [round(float(v), 6) for v in r.flatten()]  # per fixed seed, for win rates
        result.update({f"reward_{k}": float(v) for k, v in info.items() if _is_number(v)})
        if run.eval_reward is not None:
            e, einfo = run.eval_reward(images, prompts)
            result.update({"eval_reward_mean": float(e.mean()), "eval_reward_std": float(e.std())})
            result["eval_sample_rewards"] = [round(float(v), 6) for v in e.flatten()]
            result.update({f"eval_reward_{k}": float(v) for k, v in einfo.items() if _is_number(v)})
        per_prompt_r = {}
        for p in dict.fromkeys(prompts):
            idx = [i for i, q in enumerate(prompts) if q == p]
            per_prompt_r[p] = float(r[idx].mean())
        result["per_prompt_reward"] = per_prompt_r
        result.update(sample_metrics(run.model, images, prompts, run.reward, cfg.eval.beta))
    if kl:
        from .kl import path_kl

        all_prompts, gens = eval_set(run.model.device, run.prompts, per_prompt, seed, "eval-kl")
        ref_sampler = eval_sampler(run.sampler, cfg.eval.sampling)
        if sampler.eta == 0 or sampler.solver is not None:  # deterministic paths have no KL: measure it on the stochastic paths (eta 1)
            sampler, ref_sampler = sampler.replace(eta=1.0, solver=None), ref_sampler.replace(eta=1.0, solver=None)
        with eval_mode(run.model):
            k = path_kl(run.model, sampler, run.reference, ref_sampler, all_prompts, gens)
        result["kl"], result["kl_std"] = float(k.mean()), float(k.std())
    if grid_path is not None:
        save_grid(images, prompts, grid_path, title=f"{label} {run.reward.name} = {result['reward_mean']:.3f}")
    return result


def sample_metrics(model, images: torch.Tensor, prompts: list[str], reward=None, beta: float = 1.0) -> dict:
    """Diversity, Fréchet distance (when the space has real data), class histogram (and the space's
    extras) of decoded samples."""
    from .metrics import class_histogram, frechet_distance, pairwise_diversity
    from .spaces import get_space, real_features

    space = get_space(model)
    if space is None:
        return {}
    feats, real = space.features(images).cpu(), real_features(model)
    out = {"diversity": pairwise_diversity(feats, prompts)}
    if real is not None:  # no real data: no Fréchet distance
        out["frechet"] = frechet_distance(feats, real)
        # the same distance for a random same-size subset of real data: what sampling error alone gives at this n
        sub = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:len(feats)]
        out["frechet_real"] = frechet_distance(real[sub], real)
    if space.classes is not None:
        out["class_histogram"] = class_histogram(space.classes(images), space.num_classes)
    if space.extra is not None and reward is not None:
        out.update(space.extra(images, reward, beta))
    return out


def compare(base: dict, aligned: dict) -> dict:
    """What only makes sense against the base: win rates (same seeds) and diversity ratio."""
    out = {"win_rate": win_rate(base, aligned), "eval_win_rate": win_rate(base, aligned, "eval_sample_rewards")}
    if base.get("diversity"):
        out["diversity_rel"] = aligned["diversity"] / base["diversity"]
    return out


def as_baseline(base: dict) -> dict:
    """The base model's evaluation with the comparison keys filled in against itself
    (win rates 0.5 or None, diversity ratio 1, KL 0), so it reads like an aligned row."""
    return {**base, **compare(base, base), "kl": 0.0}


def win_rate(base: dict, final: dict, key: str = "sample_rewards") -> float | None:
    """Fraction of the fixed evaluation seeds/prompts where `final`'s sample beats `base`'s
    (same noise, same prompt); ties count half. None when either lacks per-sample rewards."""
    from .metrics import win_rate as rate

    return rate(base.get(key), final.get(key))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_grid(images: torch.Tensor, prompts: list[str], path: Path, title: str = "") -> Path:
    """One row per prompt: an image grid for NCHW images, a scatter plot for 2-D points, a histogram for 1-D."""
    plt = pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = images.detach().float().cpu()
    if images.ndim == 2 and images.shape[1] == 1:  # 1-D points
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.hist(images[:, 0].numpy(), bins=40)
    elif images.ndim == 2:  # points
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(images[:, 0], images[:, 1], s=4, alpha=0.5)
        ax.set_aspect("equal")
    else:
        rows = list(dict.fromkeys(prompts))
        cols = max(prompts.count(p) for p in rows)
        fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 0.6, len(rows) * 0.6), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        seen = {p: 0 for p in rows}
        for img, p in zip(images, prompts):
            r, c = rows.index(p), seen[p]
            seen[p] += 1
            pic = img.permute(1, 2, 0).clamp(0, 1).numpy()
            axes[r, c].imshow(pic[..., 0] if pic.shape[-1] == 1 else pic, cmap="gray", vmin=0, vmax=1)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report_images(run_dir: Path) -> Path | None:
    """reward_curve.png: training reward per epoch against reward queries."""
    plt = pyplot()

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    tr = [(r["reward_queries"], r["reward_mean"]) for r in rows if "reward_mean" in r]  # offline methods: none
    if tr:
        ax.plot(*zip(*tr), marker=".", label="training batch")
    # the fixed evaluation set: base (0 queries), any evaluations during training, final
    run = Path(run_dir)
    points = []
    if (run / "eval_base.json").exists():
        points.append((0, json.loads((run / "eval_base.json").read_text())))
    points += [(r["reward_queries"], {k[5:]: v for k, v in r.items() if k.startswith("eval_")}) for r in rows
               if "eval_reward_mean" in r]
    if (run / "summary.json").exists():
        s = json.loads((run / "summary.json").read_text())
        points.append((s["reward_queries"], s["final"]))
    for key, label in (("reward_mean", "eval set: training reward"), ("eval_reward_mean", "eval set: held-out reward")):
        pts = [(q, e[key]) for q, e in points if key in e]
        if pts:
            ax.plot(*zip(*pts), marker="o", linestyle="--", label=label)
    ax.set_xlabel("reward queries")
    ax.set_ylabel("reward")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.grid(alpha=0.3)
    out = Path(run_dir) / "reward_curve.png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
