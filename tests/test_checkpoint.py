
import pytest
import torch

from diffalign import checkpoint


def _model_opt():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    m.bias.requires_grad_(False)
    opt = torch.optim.AdamW([m.weight], lr=0.1)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    return m, opt


def test_save_load_round_trip_and_only_trainable(tmp_path):
    m, opt = _model_opt()
    path = checkpoint.save(tmp_path, m, opt, {"epoch": 3, "x": [1, 2]})
    assert path.name == "epoch-000003"
    from safetensors.torch import load_file

    assert set(load_file(str(path / "trainable.safetensors"))) == {"weight"}
    m2, opt2 = _model_opt()
    with torch.no_grad():
        m2.weight.zero_()
    state = checkpoint.load(path, m2, opt2)
    assert state == {"epoch": 3, "x": [1, 2]}
    assert torch.equal(m2.weight, m.weight)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_keeps_newest_and_latest(tmp_path):
    m, opt = _model_opt()
    for e in (1, 2, 3, 10):
        checkpoint.save(tmp_path, m, opt, {"epoch": e}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["epoch-000003", "epoch-000010"]
    assert checkpoint.latest(tmp_path).name == "epoch-000010"


def test_crash_mid_write_leaves_previous_checkpoint(tmp_path):
    m, opt = _model_opt()
    checkpoint.save(tmp_path, m, opt, {"epoch": 1})
    with pytest.raises(RuntimeError):
        with checkpoint.atomic_dir(tmp_path / "epoch-000002") as tmp:
            (tmp / "trainable.safetensors").write_text("half")
            raise RuntimeError("killed")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["epoch-000001"]
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_corrupt_or_incomplete_checkpoint_is_a_clear_error(tmp_path):
    m, opt = _model_opt()
    path = checkpoint.save(tmp_path, m, opt, {"epoch": 1})
    (path / "trainable.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="corrupt.*delete it"):
        checkpoint.load(path, m, opt)
    (path / "state.json").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete.*state.json"):
        checkpoint.load(path, m, opt)
