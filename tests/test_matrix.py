"""The method x model matrix: every registered method on every kind of model — the embedded DDIM and flow
models, and tiny random SD 1.x, SD3 and FLUX.1 pipeline folders — trains one tiny epoch, or refuses when
the config is resolved with a message that says why (`REFUSALS`). The folder kinds run in bf16 mixed
precision with gradient checkpointing on. The README's matrix is generated from these lists
(`python scripts/matrix.py`), and `test_readme_shows_this_matrix` keeps the two equal."""

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffalign.cli import main
from diffalign.config import ConfigError
from diffalign.methods import list_methods
from diffalign.train import resolve_config, train

ROOT = Path(__file__).resolve().parents[1]
METHODS = [name for name, _ in list_methods()]
KINDS = {  # kind -> (model, how the README names it)
    "ddim": ("digits", "embedded DDIM (`digits`, `toy2d`)"),
    "flow": ("digits-flow", "embedded flow (`digits-flow`, `toy2d-flow`)"),
    "sd": ("sd", "SD 1.x/2.x folder"),
    "sd3": ("sd3", "SD3 folder"),
    "flux": ("flux", "FLUX.1 folder"),
}
FOLDERS = ("sd", "sd3", "flux")
FLOW = ("flow", "sd3", "flux")
# (method, kind) -> a phrase of the refusal (shown in the README); every other cell must train
REFUSALS = {(m, k): "Doob h-transform written for DDIM/DDPM" for m in ("ddo", "ddo-dpo", "ddo-kto") for k in FLOW}
ARGS = {"grpo": {"group_size": 2}, "nft": {"group_size": 2}, "awm": {"group_size": 2},
        "ddo": {"fit_size": 16, "fit_epochs": 1, "particles": 2, "continuation_steps": 2},
        "ddo-dpo": {"particles": 2, "continuation_steps": 2}, "ddo-kto": {"particles": 2, "continuation_steps": 2},
        "refl": {"window": 2, "target": 1.0}, "spo": {"threshold": 0.0, "single_path_steps": 2},
        "tailorpo": {"train_steps": [3, 1]}, "tailorpo-g": {"train_steps": [3, 1]},
        "constrained": {"conditional": False, "data": "PNGS",
                        "constraints": [{"data": "samples:4", "name": "own", "kind": "distill", "bound": 0.01}]}}
OFFLINE = ("diffusion-dpo", "diffusion-kto", "ddo-dpo", "ddo-kto")
CELLS = [(m, k) for m in METHODS for k in KINDS]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Eight 40x40 grey images and pairs files over them, with the digits' prompts and text prompts (the
    offline methods read them on any model kind)."""
    d = tmp_path_factory.mktemp("images")
    for i in range(8):
        a = (torch.rand(40, 40, generator=torch.Generator().manual_seed(i)) * 255).byte()  # grey: fits digits too
        Image.fromarray(a.numpy()).save(d / f"{i}.png")
    for name, prompts in (("digits", ["1", "7"]), ("text", ["a cat", "a dog"])):
        rows = [{"prompt": prompts[i % 2], "chosen": f"{2 * i}.png", "rejected": f"{2 * i + 1}.png"} for i in range(4)]
        (d / f"pairs-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def spec(method: str, kind: str, folder: str | None, images: Path) -> dict:
    prompts = ["1", "7"] if kind in ("ddim", "flow") else ["a cat", "a dog"]
    args = dict(ARGS.get(method, {}))
    if args.get("data") == "PNGS":
        args["data"] = str(images)
    if method in OFFLINE:
        args["data"] = str(images / ("pairs-digits.jsonl" if kind in ("ddim", "flow") else "pairs-text.jsonl"))
    out = {"method": method, "model": folder or KINDS[kind][0], "prompts": prompts, "args": args,
           "reward": "classifier" if kind in ("ddim", "flow") else "ink",
           "sampling": {"num_steps": 3}, "optim": {"lr": 1e-2},
           "train": {"batch_size": 4, "batches_per_epoch": 1, "epochs": 1},
           "eval": {"reward": None, "per_prompt": 2}}
    if kind in FOLDERS:
        out["train"].update(gradient_checkpointing=True, mixed_precision="bf16")
    if kind == "flux":
        out["pipeline"] = {"resolution": 32}
    return out


@pytest.mark.parametrize("method,kind", CELLS, ids=[f"{m}-{k}" for m, k in CELLS])
def test_cell(method, kind, images, tmp_path, request):
    folder = request.getfixturevalue(kind) if kind in FOLDERS else None
    refusal = REFUSALS.get((method, kind))
    if refusal is not None:  # refused when the config is resolved or the method is built, before any epoch
        with pytest.raises(ConfigError, match=re.escape(refusal)):
            cfg, args = resolve_config(base=spec(method, kind, folder, images))
            train(cfg, args, tmp_path / "run")
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
        return
    cfg, args = resolve_config(base=spec(method, kind, folder, images))
    summary = train(cfg, args, tmp_path / "run")
    assert summary["finished"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(torch.isfinite(torch.tensor(v)) for r in rows for v in r.values() if isinstance(v, float))
    final = tmp_path / "run" / "final"
    if (final / "pytorch_lora_weights.safetensors").exists():
        ups = [v for k, v in load_file(str(final / "pytorch_lora_weights.safetensors")).items() if "lora_B" in k]
        assert ups and any(v.abs().sum() > 0 for v in ups), f"{method} left its LoRA at the zero init"
    elif method.startswith("ddo"):  # the base weights stay; DDO learns its networks beside them
        assert (final / "potential.safetensors").exists() or (final / "correction.safetensors").exists()
        if kind in FOLDERS:  # so there is no pipeline to export
            assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "x")]) == 2
            assert not (tmp_path / "x").exists()
    elif kind in FOLDERS:  # a full fine-tune: final/ is a pipeline component that moved
        part = "unet" if kind == "sd" else "transformer"
        tuned = load_file(str(final / part / "diffusion_pytorch_model.safetensors"))
        base = load_file(f"{folder}/{part}/diffusion_pytorch_model.safetensors")
        assert any(not torch.equal(tuned[k], base[k]) for k in base)
    else:
        assert any(final.glob("**/*.safetensors"))


def matrix_markdown() -> str:
    """The README's matrix: one row per method, one column per model kind."""
    head = "| method | " + " | ".join(name for _, name in KINDS.values()) + " |"
    rows = [head, "|---|" + "---|" * len(KINDS)]
    for m in METHODS:
        cells = [f"refuses: {REFUSALS[(m, k)]}" if (m, k) in REFUSALS else "trains" for k in KINDS]
        rows.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def test_readme_shows_this_matrix():
    text = (ROOT / "README.md").read_text()
    start, end = "<!-- matrix: python scripts/matrix.py -->", "<!-- /matrix -->"
    assert start in text and end in text, "README.md lost its matrix markers"
    shown = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert shown == matrix_markdown(), "README.md's method x model matrix is stale: run python scripts/matrix.py"
