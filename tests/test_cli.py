"""The command line as a user meets it: listings and clear errors for bad input."""

import json

import pytest
import yaml

from diffalign.cli import main



def test_listings(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("ddpo") or "ddpo " in out
    assert main(["rewards"]) == 0
    out = capsys.readouterr().out
    for name in ("classifier ", "classifier_heldout", "ink", "compressibility", "quadratic"):
        assert name in out
    assert "[differentiable]" in out
    assert main(["models"]) == 0
    assert "digits" in capsys.readouterr().out


def _run(tmp_path, capsys, spec: dict, out="run"):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    code = main(["train", str(cfg), "--out", str(tmp_path / out)])
    return code, capsys.readouterr().err


TOY = {"method": "ddpo", "model": "toy2d", "reward": "quadratic", "prompts": [""], "eval": {"reward": None},
       "train": {"epochs": 1, "batch_size": 4, "batches_per_epoch": 1}, "sampling": {"num_steps": 4}}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"method": "ddpoo"}, "unknown method 'ddpoo'"),
        ({"reward": "clasifier"}, "unknown reward 'clasifier'"),
        ({"model": "mnist"}, "unknown model 'mnist'"),
        ({"train": {"epochz": 3}}, "unknown config key 'train.epochz'; did you mean 'epochs'"),
        ({"sampling": {"eta": 0.0}}, "eta > 0"),
        ({"reward": "custom_reward:make_nan"}, "NaN"),
        ({"reward": "custom_reward:make_wrong_shape"}, "shape"),
        ({"method": "ddpo", "args": {"clip_rang": 0.1}}, "unknown config key 'args.clip_rang'"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_no_run(tmp_path, capsys, change, message):
    spec = {**TOY, **change}
    code, err = _run(tmp_path, capsys, spec)
    assert code == 2
    assert message in err, err
    assert "Traceback" not in err
    if "custom_reward" not in str(change):  # config errors are caught before anything is written
        assert not (tmp_path / "run").exists()


def test_existing_run_is_never_overwritten_and_resume_needs_a_run(tmp_path, capsys):
    code, _ = _run(tmp_path, capsys, TOY)
    assert code == 0
    before = (tmp_path / "run" / "summary.json").read_text()
    code, err = _run(tmp_path, capsys, TOY)
    assert code == 2 and "not empty" in err and "--resume" in err
    assert (tmp_path / "run" / "summary.json").read_text() == before
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_full_fine_tuning_option(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, {**TOY, "lora": {"enabled": False}})
    assert code == 0, err
    assert (tmp_path / "run" / "final" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"]
    assert summary["kl"] is None  # DDPO keeps no frozen copy when fully fine-tuning
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    assert main(["eval", str(tmp_path / "run")]) == 0  # eval rebuilds the base from the untouched weights
    e = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert e["base"]["kl"] == 0 and e["aligned"]["kl"] > 0


def test_sample_command_points_images_base_and_errors(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    from safetensors import safe_open

    from diffalign.train import resolve_config, train

    # a run that moves the model visibly (the default DDPO step barely does in one epoch)
    code, err = _run(tmp_path, capsys, dict(TOY, optim={"lr": 1e-2}, args={"clip_range": 0.2},
                                           train=dict(TOY["train"], epochs=2)))
    assert code == 0, err
    run = tmp_path / "run"
    assert main(["sample", str(run), "--out", str(tmp_path / "pts"), "--n", "10", "--seed", "3"]) == 0
    pts = np.load(tmp_path / "pts.npy")
    assert pts.shape == (10, 2) and "10 samples of the aligned model" in capsys.readouterr().out
    with safe_open(str(tmp_path / "pts.safetensors"), "pt") as f:
        assert np.allclose(f.get_tensor("samples").numpy(), pts) and f.get_tensor("latents").shape == (10, 2)
        meta = f.metadata()
    assert meta["model"] == "aligned" and json.loads(meta["prompts"]) == [""] * 10 and meta["seed"] == "3"
    assert main(["sample", str(run), "--out", str(tmp_path / "base.npy"), "--n", "10", "--seed", "3", "--base"]) == 0
    assert main(["sample", str(run), "--out", str(tmp_path / "base2.npy"), "--n", "10", "--seed", "3", "--base"]) == 0
    base = np.load(tmp_path / "base.npy")
    assert np.array_equal(base, np.load(tmp_path / "base2.npy")) and not np.allclose(base, pts)

    # images: a grid with one row per prompt, pixels enlarged
    cfg, args = resolve_config(base={"method": "ddpo", "model": "digits", "prompts": ["3", "7"], "sampling": {"num_steps": 4},
                                     "train": {"epochs": 1, "batch_size": 4, "batches_per_epoch": 1},
                                     "eval": {"reward": None, "per_prompt": 2}})
    train(cfg, args, tmp_path / "digits")
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "digits"), "--out", str(tmp_path / "grid.png"), "--prompts", "1", "2", "5",
                 "--n", "6"]) == 0
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == (2 * 64, 3 * 64)  # 2 per prompt, 3 prompts, 8x8 digits shown at 64x64
    with safe_open(str(tmp_path / "grid.safetensors"), "pt") as f:
        assert f.get_tensor("samples").shape == (6, 1, 8, 8)
        assert json.loads(f.metadata()["prompts"]) == ["1", "1", "2", "2", "5", "5"]

    # bad input: one clear error, nothing written
    from diffalign.train import resolve_config as rc

    unfinished = tmp_path / "unfinished"
    c2, a2 = rc(base=dict(TOY, train=dict(TOY["train"], epochs=3)))
    train(c2, a2, unfinished, max_epochs=1)
    capsys.readouterr()
    for argv, message in [
        ([str(tmp_path / "nothing"), "--out", str(tmp_path / "x.npy")], "not a run folder"),
        ([str(unfinished), "--out", str(tmp_path / "x.npy")], "has not finished training"),
        ([str(tmp_path / "digits"), "--out", str(tmp_path / "x.png"), "--prompts", "seven"], "must name exactly one digit"),
        ([str(run), "--out", str(tmp_path / "x.png")], "give a .npy path"),
    ]:
        assert main(["sample", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not list(tmp_path.glob("x.*"))
