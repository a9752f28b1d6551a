"""The example configs for real pipeline folders (configs/sd15/, configs/flux/): each validates as written
and runs one tiny epoch with its weights pointed at a tiny random pipeline of its kind, CLIP and aesthetic
head (the real ones are not here: these configs are not run at scale in this project)."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffalign.config import load_raw
from diffalign.models.tiny import make_tiny_clip
from diffalign.rewards import images as ri
from diffalign.train import resolve_config, train

ROOT = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(ROOT.glob("sd15/*.yaml")) + sorted(ROOT.glob("flux/*.yaml"))


@pytest.fixture(scope="module")
def weights(sd, flux, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    clip = make_tiny_clip(root / "clip")
    torch.manual_seed(0)
    head = root / "head.safetensors"
    from safetensors.torch import save_file

    save_file(ri.AestheticHead((32, 16, 8, 8, 4)).state_dict(), str(head))
    data = root / "data"
    rows, labels = [], []
    for i in range(4):
        for side in ("c", "r"):
            a = (torch.rand(40, 40, 3, generator=torch.Generator().manual_seed(2 * i + (side == "r"))) * 255).byte()
            (data / "img").mkdir(parents=True, exist_ok=True)
            Image.fromarray(a.numpy()).save(data / "img" / f"{i}{side}.png")
            labels.append({"prompt": "cat", "image": f"img/{i}{side}.png", "label": side == "c"})
        rows.append({"prompt": "cat", "chosen": f"img/{i}c.png", "rejected": f"img/{i}r.png"})
    (data / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
    return {"sd": sd, "flux": flux, "clip": clip, "head": head, "data": data}


def test_there_are_sd15_and_flux_configs():
    names = {f"{c.parent.name}/{c.stem}" for c in CONFIGS}
    assert {f"sd15/{n}" for n in ("ddpo_aesthetic", "tailorpo_g_aesthetic", "nabla_gfn_aesthetic", "diffusion_dpo",
                                  "diffusion_kto")} <= names
    assert {"flux/grpo_pickscore", "flux/nft_pickscore", "flux/adjoint_matching_aesthetic"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_config_validates_and_runs_one_tiny_epoch(path, weights, tmp_path):
    raw = load_raw(path)
    assert "NOT RUN AT SCALE" in path.read_text()
    resolve_config(path)  # as written: keys and values valid (the folders need not exist to validate)
    reward = raw["reward"].replace("models/clip-vit-large-patch14", str(weights["clip"]))
    reward = reward.replace("models/aesthetic/sac+logos+ava1-l14-linearMSE.safetensors", str(weights["head"]))
    reward = reward.replace("models/PickScore_v1", str(weights["clip"]))
    assert reward != raw["reward"]
    args = dict(raw.get("args", {}))
    if "data" in args:
        args["data"] = str(weights["data"] / Path(args["data"]).name)
    flux = path.parent.name == "flux"
    over = {"model": str(weights["flux" if flux else "sd"]), "reward": reward, "prompts": ["cat", "dog"], "args": args,
            "sampling": {**raw["sampling"], "num_steps": 3},
            "train": {**raw["train"], "epochs": 1, "batch_size": 2, "batches_per_epoch": 1, "mixed_precision": "no"},
            "eval": {**raw.get("eval", {}), "per_prompt": 2}}
    if raw.get("eval", {}).get("features"):
        over["eval"]["features"] = str(weights["clip"])
    if "train_steps" in args:  # TailorPO's remaining-step lists; Adjoint Matching's count (of them the last)
        args["train_steps"] = 1 if raw["method"] == "adjoint-matching" else [2, 1]
        args["last_steps"] = min(args.get("last_steps", 0), 1) if raw["method"] == "adjoint-matching" else None
        args = {k: v for k, v in args.items() if v is not None}
        over["args"] = args
    if "minibatches" in args:
        args["minibatches"] = 1
    if "group_size" in args:
        args["group_size"] = 2
    if flux:  # the tiny folder at 32 px, in the configs' own bf16
        over["pipeline"] = {**raw.get("pipeline", {}), "resolution": 32}
        over["train"]["mixed_precision"] = raw["train"]["mixed_precision"]
    cfg, a = resolve_config(base={**raw, **over})
    summary = train(cfg, a, tmp_path / "run")
    assert summary["finished"] and torch.isfinite(torch.tensor(summary["final_reward_mean"]))
