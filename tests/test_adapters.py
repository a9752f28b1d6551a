import torch

from diffalign import adapters


def test_lora_starts_at_base_trains_only_adapters_and_reference_is_base(tiny, tmp_path):
    den = tiny.denoiser
    x, t, c = torch.randn(2, 1, 4, 4), torch.tensor([10, 500]), torch.tensor([0, 1])
    base = den(x, t, c).detach()
    n_before = sum(p.numel() for p in den.parameters())
    adapters.add_lora(den, ["inp", "mid"], rank=2, alpha=2)
    trainable = [n for n, p in den.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in den.parameters()) > n_before  # adapters, not a second copy
    torch.testing.assert_close(den(x, t, c), base)  # lora_B starts at zero
    with torch.no_grad():
        for n, p in den.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    assert not torch.allclose(den(x, t, c), base)
    with adapters.adapters_disabled(den):
        torch.testing.assert_close(den(x, t, c), base)
        # the switch leaves requires_grad alone (FSDP swaps parameter objects inside a forward)
        assert [n for n, p in den.named_parameters() if p.requires_grad] == trainable
    assert [n for n, p in den.named_parameters() if p.requires_grad] == trainable  # restored
    # save in the diffusers layout and load into a fresh model
    adapters.save_lora(den, tmp_path / "lora")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "lora" / adapters.LORA_FILE))
    assert all(k.startswith("unet.") and "lora_" in k for k in keys)
    from tiny_models import tiny_model

    other = tiny_model().denoiser
    adapters.add_lora(other, ["inp", "mid"], rank=2, alpha=2)
    adapters.load_lora(other, tmp_path / "lora")
    torch.testing.assert_close(other(x, t, c), den(x, t, c))


def test_bad_targets_and_missing_folder(tiny, tmp_path):
    import pytest

    with pytest.raises(ValueError, match="match no module"):
        adapters.add_lora(tiny.denoiser, ["to_q"])
    with pytest.raises(FileNotFoundError, match="no LoRA weights"):
        adapters.load_lora(tiny.denoiser, tmp_path / "nope")
