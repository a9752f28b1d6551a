"""Diffusion-DPO and Diffusion-KTO on a pipeline folder: JSONL feedback of real images
(chosen/rejected or winner/loser pairs, labels; any size, paths relative to the file),
VAE latents cached on disk, bad rows by line number, and `diffalign data pairs|labels
--model PATH` building sets from the model's own samples."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffalign.cli import main
from diffalign.data import feedback, latents
from diffalign.models import load_model
from diffalign.train import resolve_config, train

PROMPTS = ["a cat", "a dog"]
BASE = {"reward": "brightness", "prompts": PROMPTS, "sampling": {"num_steps": 4}, "optim": {"lr": 1e-2},
        "train": {"batch_size": 4, "batches_per_epoch": 2, "epochs": 1}, "eval": {"reward": None, "per_prompt": 2}}


def png(path, h, w, grey=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(h, w, generator=g) if grey else torch.rand(h, w, 3, generator=g)) * 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a.byte().numpy()).save(path)
    return path


@pytest.fixture()
def real_pairs(tmp_path):
    """A Pick-a-Pic style pairs file: chosen/rejected, RGB and grey images of other sizes than 32x32."""
    d = tmp_path / "set"
    rows = []
    for i in range(4):
        png(d / "img" / f"{i}_c.png", 48, 40, seed=2 * i)
        png(d / "img" / f"{i}_r.png", 24, 32, grey=True, seed=2 * i + 1)
        rows.append({"prompt": PROMPTS[i % 2], "chosen": f"img/{i}_c.png", "rejected": f"img/{i}_r.png"})
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "pairs.jsonl"


def test_fit_resizes_the_short_edge_and_centre_crops():
    x = torch.rand(1, 24, 48)
    y = latents.fit(x, 16)
    assert y.shape == (3, 16, 16)  # grey to RGB, 24x48 -> 16x32 -> centre 16x16
    assert latents.fit(x, None) is x


def test_latents_are_cached_per_file(sd, real_pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFALIGN_CACHE", str(tmp_path / "cache"))
    m = load_model(sd)
    ps, x_w, x_l = latents.pairs(m, real_pairs)
    assert len(ps) == 4 and ps.winners is None and x_w.shape == (4, *m.sample_shape) == x_l.shape
    assert len(list((tmp_path / "cache").glob("latents-*"))) == 1
    calls = []
    monkeypatch.setattr(m, "encode_images", lambda images: calls.append(1) or images)
    _, again, _ = latents.pairs(m, real_pairs)  # a second load reads the cache: no VAE call
    assert not calls and torch.equal(again, x_w)
    png(real_pairs.parent / "img" / "0_c.png", 48, 40, seed=99)  # a changed file is encoded anew
    latents.pairs(m, real_pairs)
    assert calls and len(list((tmp_path / "cache").glob("latents-*"))) == 2


def test_bad_rows_are_reported_by_line_number(real_pairs):
    lines = real_pairs.read_text().splitlines()
    lines[1] = json.dumps({"prompt": "a cat", "chosen": "img/missing.png", "rejected": "img/0_r.png"})
    lines[2] = "{not json"
    lines.append(json.dumps({"prompt": "a dog", "chosen": "img/0_c.png"}))
    real_pairs.write_text("\n".join(lines) + "\n")
    with pytest.raises(feedback.FeedbackError) as e:
        feedback.load_pairs(real_pairs, images=False)
    msg = str(e.value)
    assert "3 bad row(s)" in msg and "line 2: 'chosen' file 'img/missing.png' not found" in msg
    assert "line 3: invalid JSON" in msg and "line 5: missing key(s) rejected" in msg


@pytest.mark.parametrize("method", ["diffusion-dpo", "diffusion-kto"])
def test_offline_methods_train_on_real_image_feedback(sd, real_pairs, tmp_path, method):
    data = real_pairs
    if method == "diffusion-kto":  # a labels file: {prompt, image, desirable}
        rows = [{"prompt": PROMPTS[i % 2], "image": f"img/{i}_{s}.png", "desirable": s == "c"}
                for i in range(4) for s in ("c", "r")]
        data = real_pairs.parent / "labels.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg, args = resolve_config(base=dict(BASE, model=sd, method=method, args={"data": str(data)}))
    summary = train(cfg, args, tmp_path / "run")
    assert summary["finished"] and summary["reward_queries"] == 0
    lora = load_file(str(tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)


def test_data_pairs_and_labels_from_a_pipeline_folder(sd, tmp_path):
    out = tmp_path / "pairs"
    assert main(["data", "pairs", "--model", sd, "--reward", "brightness", "--prompts", "a cat,a dog", "--n", "4",
                 "--steps", "3", "--out", str(out)]) == 0
    ps = feedback.load_pairs(out / "pairs.jsonl")
    assert ps.winners.shape[1:] == (3, 32, 32) and set(ps.prompts) == set(PROMPTS)
    lab = tmp_path / "labels"
    assert main(["data", "labels", "--model", sd, "--reward", "brightness", "--prompts", "a cat,a dog", "--n", "2",
                 "--steps", "3", "--out", str(lab)]) == 0
    ls = feedback.load_labels(lab / "labels.jsonl")
    assert len(ls) >= 2 and ls.desirable.any()
    assert main(["data", "pairs", "--model", sd, "--reward", "brightness", "--n", "2", "--out", str(tmp_path / "x")]) == 2
