"""The regression set for core changes: a short run of every method on toy2d and digits, with 1 and 2 processes.

    python scripts/regression.py --out runs/regression --save before.json     # on the old core
    python scripts/regression.py --out runs/regression2 --compare before.json # on the new one

Prints one SHA-256 per run of its final weights (every module's safetensors, in name order) and, with
--compare, which runs changed. A core change that only moves bookkeeping must leave every hash as it was;
a change on purpose is listed in docs/results/core-v3.md with its reason. Takes about 15 minutes on 2 CPU cores."""

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

TINY_TRAIN = {"epochs": 2, "batch_size": 8, "batches_per_epoch": 1}
MODELS = {
    "toy2d": {"model": "toy2d", "reward": "quadratic", "prompts": [""], "sampling": {"num_steps": 6},
              "eval": {"reward": None, "per_prompt": 8}},
    "digits": {"model": "digits", "reward": "classifier", "prompts": ["1", "7"], "sampling": {"num_steps": 4},
               "eval": {"reward": None, "per_prompt": 2}},
}
FLOW = {"grpo": "-flow"}  # methods whose shipped configs run on the flow variant
ARGS = {  # small settings that exercise minibatches and every method's own machinery
    "ddpo": {"minibatches": 2}, "dpok": {"minibatch": 8, "policy_steps": 2, "value_steps": 1}, "refl": {"window": 3},
    "grpo": {"minibatches": 2, "group_size": 4},
    "d3po": {"minibatches": 2}, "spo": {"k": 2, "single_path_steps": 3, "minibatches": 2},
    "tailorpo": {"minibatches": 2, "train_steps": [4, 2]}, "tailorpo-g": {"minibatches": 2, "train_steps": [4, 2]},
    "ddo": {"particles": 2, "continuation_steps": 2}, "ddo-dpo": {"particles": 2, "continuation_steps": 2},
    "ddo-kto": {"particles": 2, "continuation_steps": 2},
    "constrained": {"data": "digits:minority=4,5,7:fraction=0.25", "constraint_batch": 4, "dual_every": 1,
                    "constraints": [{"name": "4", "data": "digits:minority=4,5,7:fraction=0.25:classes=4",
                                     "bound": 0.1}]},
}
OFFLINE = {"ddo-dpo", "ddo-kto", "diffusion-dpo", "diffusion-kto"}


def specs(pairs: dict[str, str]):
    from diffalign.methods import list_methods

    for method, _ in list_methods():
        for model in ("toy2d", "digits"):
            if method == "constrained" and model == "toy2d":
                continue  # its data are images
            base = dict(MODELS[model], method=method, seed=0, train=dict(TINY_TRAIN), optim={"lr": 1e-3})
            base["model"] = model + FLOW.get(method, "")
            args = dict(ARGS.get(method, {}))
            if method in OFFLINE:
                args["data"] = pairs[model]
            if method == "constrained":
                base.update(prompts=[""], reward="ink", sampling={"num_steps": 4, "guidance_scale": 1.0})
            base["args"] = args
            yield f"{method}-{model}", base


def make_pairs(out: Path) -> dict[str, str]:
    from diffalign.data import feedback
    from diffalign.models import load_model
    from diffalign.rewards import build_reward
    from diffalign.sampler import Sampler

    paths = {}
    for model, m in MODELS.items():
        folder = out / f"pairs-{model}"
        if not (folder / "pairs.jsonl").exists():
            feedback.make_pairs(load_model(model, progress=False), build_reward(m["reward"]), m["prompts"], 16,
                                folder, sampler=Sampler(num_steps=m["sampling"]["num_steps"]))
        paths[model] = str(folder / "pairs.jsonl")
    return paths


def weights_hash(run: Path) -> str:
    """Of the tensors, not the file bytes: safetensors writes its header metadata in varying order."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for f in sorted((run / "final").glob("**/*.safetensors")):
        h.update(f.relative_to(run).as_posix().encode())
        for key, t in sorted(load_file(str(f)).items()):
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def run_one(spec: dict, out: Path, processes: int, port: int) -> str:
    cfg = out.with_suffix(".yaml")
    cfg.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "diffalign.cli", "train", str(cfg), "--out", str(out)]
    if processes > 1:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "diffalign.cli", "train", str(cfg),
               "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return "failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return weights_hash(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/regression")
    p.add_argument("--save", help="write the hashes to this JSON file (added to the hashes it holds)")
    p.add_argument("--compare", help="a JSON file written by --save: list the runs whose hash differs")
    p.add_argument("--only", help="comma-separated run names (e.g. ddpo-toy2d) to run")
    p.add_argument("--processes", default="1,2")
    p.add_argument("--rehash", action="store_true", help="hash the finished runs in --out again, without training")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = {m: str(out / f"pairs-{m}" / "pairs.jsonl") for m in MODELS} if a.rehash else make_pairs(out)
    only = set(a.only.split(",")) if a.only else None
    hashes = {}
    for i, (name, spec) in enumerate(specs(pairs)):
        if only and name not in only:
            continue
        for n in map(int, a.processes.split(",")):
            key = f"{name}/{n}"
            folder = out / f"{name}-p{n}"
            if a.rehash:
                hashes[key] = weights_hash(folder) if (folder / "final").exists() else "failed: no final weights"
            else:
                hashes[key] = run_one(spec, folder, n, 29600 + i)
            print(f"{key:28s} {hashes[key]}", flush=True)
    if a.save:  # added to what the file holds (a run of --only updates its runs)
        saved = json.loads(Path(a.save).read_text()) if Path(a.save).exists() else {}
        Path(a.save).write_text(json.dumps({**saved, **hashes}, indent=1) + "\n")
    if a.compare:
        old = json.loads(Path(a.compare).read_text())
        changed = [k for k in hashes if old.get(k) != hashes[k]]
        print(f"{len(hashes) - len(changed)} of {len(hashes)} runs identical" +
              "".join(f"\n  changed: {k}  {old.get(k)} -> {hashes[k]}" for k in changed))


if __name__ == "__main__":
    main()
