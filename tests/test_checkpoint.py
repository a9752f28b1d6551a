import pytest
import torch

from diffalign import checkpoint


def _model_opt():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    m.bias.requires_grad_(False)
    extra = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    opt = torch.optim.AdamW([{"params": [m.weight], "name": "denoiser"},
                             {"params": list(extra.parameters()), "name": "extra", "lr": 0.5}], lr=0.1)
    (m(torch.randn(4, 3)).sum() + extra(torch.randn(4, 2)).sum()).backward()
    opt.step()
    return {"denoiser": m, "extra": extra}, opt


def test_save_load_round_trip_every_module_and_tensor_state(tmp_path):
    mods, opt = _model_opt()
    method_state = {"tracker": {"a": [1.0, 2.0]}, "mu": torch.tensor([0.5, 2.0]), "hist": [torch.ones(2, 2), 3]}
    path = checkpoint.save(tmp_path, mods, opt, {"epoch": 3, "x": [1, 2]}, method_state)
    assert path.name == "epoch-000003"
    from safetensors.torch import load_file

    assert set(load_file(str(path / "modules" / "denoiser.safetensors"))) == {"weight"}  # only what trains
    extra_keys = set(load_file(str(path / "modules" / "extra.safetensors")))
    assert {"0.weight", "0.bias", "1.running_mean", "1.running_var"} <= extra_keys  # buffers too
    # pickle (torch.save) holds the optimizer state only, read back with weights_only; weights are safetensors
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*.pt*")) == ["optimizer.pt"]
    mods2, opt2 = _model_opt()
    with torch.no_grad():
        mods2["denoiser"].weight.zero_()
        mods2["extra"][1].running_mean.fill_(9)
    state, ms = checkpoint.load(path, mods2, opt2)
    assert state == {"epoch": 3, "x": [1, 2]}
    assert ms["tracker"] == {"a": [1.0, 2.0]} and ms["hist"][1] == 3
    assert torch.equal(ms["mu"], method_state["mu"]) and torch.equal(ms["hist"][0], torch.ones(2, 2))
    for name in mods:
        for (k, a), (_, b) in zip(mods[name].state_dict().items(), mods2[name].state_dict().items()):
            assert torch.equal(a, b), (name, k)
    assert opt2.state_dict()["param_groups"][1]["lr"] == 0.5
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_keeps_newest_and_latest(tmp_path):
    mods, opt = _model_opt()
    for e in (1, 2, 3, 10):
        checkpoint.save(tmp_path, mods, opt, {"epoch": e}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["epoch-000003", "epoch-000010"]
    assert checkpoint.latest(tmp_path).name == "epoch-000010"


def test_crash_mid_write_leaves_previous_checkpoint(tmp_path):
    mods, opt = _model_opt()
    checkpoint.save(tmp_path, mods, opt, {"epoch": 1})
    with pytest.raises(RuntimeError):
        with checkpoint.atomic_dir(tmp_path / "epoch-000002") as tmp:
            (tmp / "optimizer.pt").write_text("half")
            raise RuntimeError("killed")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["epoch-000001"]
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_corrupt_incomplete_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    mods, opt = _model_opt()
    path = checkpoint.save(tmp_path, mods, opt, {"epoch": 1})
    (path / "modules" / "extra.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="corrupt.*delete it"):
        checkpoint.load(path, mods, opt)
    (path / "state.json").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete.*state.json"):
        checkpoint.load(path, mods, opt)
    path = checkpoint.save(tmp_path, mods, opt, {"epoch": 2})
    with pytest.raises(FileNotFoundError, match="modules/other.safetensors"):  # a module the run does not have
        checkpoint.load(path, {**mods, "other": torch.nn.Linear(1, 1)}, None)
    with pytest.raises(ValueError, match="module .denoiser. has tensors this run.s lacks or shapes"):  # written by another model
        checkpoint.load(path, {"denoiser": torch.nn.Conv2d(1, 1, 1), "extra": mods["extra"]}, None)
