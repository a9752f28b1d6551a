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
    assert "no run to resume" in capsys.readouterr().err


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
