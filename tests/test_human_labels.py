"""D3PO with human labels: a round per epoch, written, labelled, resumed."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffalign.data.human import LabelsNeeded
from diffalign.rewards.toy2d import quadratic
from diffalign.train import resolve_config, train

TOY = {"method": "d3po", "model": "toy2d", "reward": "quadratic", "prompts": [""], "sampling": {"num_steps": 4},
       "train": {"epochs": 2, "batch_size": 8, "batches_per_epoch": 1}, "optim": {"lr": 1e-3},
       "eval": {"reward": None, "per_prompt": 16}, "args": {"minibatches": 2}}



def label_like_the_reward(folder, tie_first=False):
    """A 'person' who prefers the point nearer the target (what the quadratic reward ranks)."""
    rows = json.loads((folder / "pairs.json").read_text())
    labels = []
    for n, row in enumerate(rows):
        ra, rb = (float(quadratic(torch.tensor([row[f"{s}_value"]]))) for s in "ab")
        choice = "tie" if (tie_first and n == 0) or ra == rb else ("a" if ra > rb else "b")
        labels.append({"prompt": row["prompt"], "a": row["a"], "b": row["b"], "choice": choice})
    (folder / "labels.json").write_text(json.dumps(labels))
    return labels


def test_human_rounds_train_like_the_reward_they_imitate(tmp_path):
    cfg, args = resolve_config(base=TOY)
    train(cfg, args, tmp_path / "reward")

    spec = dict(TOY, args=dict(TOY["args"], labels=str(tmp_path / "labels")))
    cfg, args = resolve_config(base=spec)
    run = tmp_path / "human"
    with pytest.raises(LabelsNeeded, match="8 pairs to label") as e:
        train(cfg, args, run)
    assert "--resume" in str(e.value)
    r0 = tmp_path / "labels" / "epoch-0000"
    rows = json.loads((r0 / "pairs.json").read_text())
    assert len(rows) == 8 and {"prompt", "a", "b", "a_value", "b_value"} <= set(rows[0])
    label_like_the_reward(r0)
    with pytest.raises(LabelsNeeded):  # epoch 0 trains, epoch 1 waits
        train(cfg, args, run, resume=True)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 0
    label_like_the_reward(tmp_path / "labels" / "epoch-0001")
    s = train(cfg, args, run, resume=True)
    assert s["finished"] and s["reward_queries"] == 0  # people, not the reward, ranked the pairs
    a = load_file(str(tmp_path / "reward" / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))
    for k in a:  # the same pairs in the same order: the same weights as ranking by the reward
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_bad_label_files_are_named(tmp_path):
    spec = dict(TOY, args=dict(TOY["args"], labels=str(tmp_path / "labels")))
    cfg, args = resolve_config(base=spec)
    run = tmp_path / "run"
    with pytest.raises(LabelsNeeded):
        train(cfg, args, run)
    r0 = tmp_path / "labels" / "epoch-0000"
    labels = label_like_the_reward(r0, tie_first=True)
    for broken, message in [(labels[1:], "no label for pair"),
                            ([dict(labels[0], choice="left")] + labels[1:], "choice must be 'a', 'b' or 'tie'"),
                            (labels + labels[:1], "labelled twice"),
                            ([dict(labels[0], prompt="x")] + labels[1:], "its label says 'x'")]:
        (r0 / "labels.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            train(cfg, args, run, resume=True)
    (r0 / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(LabelsNeeded):
        train(cfg, args, run, resume=True)
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert m["pairs"] == 4 * 7  # one tie dropped; 4 steps per pair (timestep_fraction 1)


def test_image_rounds_are_png_files(tmp_path):
    from PIL import Image

    from diffalign.data import human

    rows = [{"prompt": "3", "a": ia, "b": ib} for ia, ib in human.image_ids(2, 0, [0, 1])]
    assert rows[1]["b"] == "e0002-b00-i0001-b"
    human.write_round(tmp_path, rows, torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8))
    written = json.loads((tmp_path / "pairs.json").read_text())
    img = Image.open(tmp_path / written[0]["a_file"])
    assert img.size == (64, 64) and "a_value" not in written[0]


def test_a_round_covers_every_batch_of_the_epoch(tmp_path):
    """With two sampling batches per epoch, one round lists both batches' pairs and trains on them."""
    spec = dict(TOY, train=dict(TOY["train"], epochs=1, batch_size=4, batches_per_epoch=2),
                args=dict(TOY["args"], labels=str(tmp_path / "labels")))
    cfg, args = resolve_config(base=spec)
    run = tmp_path / "run"
    with pytest.raises(LabelsNeeded, match="8 pairs to label"):
        train(cfg, args, run)
    r0 = tmp_path / "labels" / "epoch-0000"
    rows = json.loads((r0 / "pairs.json").read_text())
    assert [r["a"][:9] for r in rows] == ["e0000-b00"] * 4 + ["e0000-b01"] * 4
    labels = label_like_the_reward(r0)
    s = train(cfg, args, run, resume=True)
    assert s["finished"]
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert m["pairs"] == 4 * sum(lab["choice"] != "tie" for lab in labels)
