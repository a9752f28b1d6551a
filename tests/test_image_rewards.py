"""Image rewards from local weights (a tiny random CLIP), and the reward spec call syntax."""

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from diffalign.models.tiny import make_tiny_clip
from diffalign.rewards import _parse_call, build_reward
from diffalign.rewards import images as ri

PROMPTS = ["a red cat", "a blue dog", "x"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("models") / "clip")


@pytest.fixture(scope="module")
def head(clip, tmp_path_factory):
    """A tiny aesthetic head for the 32-d tiny CLIP, through the .pth -> safetensors converter."""
    folder = tmp_path_factory.mktemp("head")
    torch.manual_seed(0)
    net = ri.AestheticHead((32, 16, 8, 8, 4))
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, folder / "head.pth")
    return ri.convert_aesthetic_head(folder / "head.pth", folder / "head.safetensors"), net.eval()


def _images(n=3, h=40, w=48, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_every_reward_returns_finite_values_at_any_resolution(clip, head):
    specs = ["jpeg-compressibility", "jpeg-incompressibility", "brightness", f"clip-score(path={clip})",
             f"pickscore(path={clip})", f"aesthetic(path={clip}, head={head[0]})"]
    for spec in specs:
        reward = build_reward(spec)
        for x in (_images(), _images(h=32, w=32), _images(h=17, w=64)[:, :1]):  # grey, too
            r, _ = reward(x, PROMPTS)
            assert r.shape == (3,) and torch.isfinite(r).all(), spec


def test_compressibility_prefers_a_flat_image():
    flat, noise = torch.full((1, 3, 64, 64), 0.5), _images(1, 64, 64)
    r, info = build_reward("jpeg-compressibility")(torch.cat([flat, noise]), ["", ""])
    assert r[0] > r[1] and info["jpeg_kb_mean"] > 0
    assert torch.equal(build_reward("jpeg-incompressibility")(torch.cat([flat, noise]), ["", ""])[0], -r)


def test_differentiable_rewards_give_gradients_on_the_images(clip, head):
    for spec in ["brightness", f"clip-score(path={clip})", f"pickscore(path={clip})",
                 f"aesthetic(path={clip}, head={head[0]})", f"1.0*clip-score(path={clip})+0.1*brightness"]:
        reward = build_reward(spec)
        assert reward.differentiable, spec
        x = _images().requires_grad_(True)
        reward(x, PROMPTS)[0].sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, spec


def test_clip_score_and_pickscore_match_transformers(clip):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(clip), local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(str(clip), local_files_only=True)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)  # at the crop size
    with torch.no_grad():
        inputs = processor(text=PROMPTS, images=list(pixels), return_tensors="pt", padding=True)
        want = model(**inputs).logits_per_image.diag()
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        pick = build_reward(f"pickscore(path={clip})")(x, PROMPTS)[0]
        cos = build_reward(f"clip-score(path={clip})")(x, PROMPTS)[0]
    torch.testing.assert_close(pick, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cos, want / model.logit_scale.exp(), atol=1e-4, rtol=1e-4)


def test_models_load_once_frozen(clip):
    a, b = ri.load_clip(clip), ri.load_clip(str(clip) + "/")
    assert a is b and not a.model.training and not any(p.requires_grad for p in a.model.parameters())


def test_missing_files_name_the_path_and_what_it_must_hold(clip, head, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.*does not exist.*config.json.*model.safetensors"):
        build_reward("clip-score", path=tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"half.*lacks model.safetensors, tokenizer.json"):
        build_reward(f"pickscore(path={tmp_path / 'half'})")
    with pytest.raises(ValueError, match=r"clip-score needs path=FOLDER.*clip-score\(path="):
        build_reward("clip-score")
    with pytest.raises(FileNotFoundError, match=r"head file .*missing.safetensors.*layers.0.weight"):
        build_reward("aesthetic", path=str(clip), head=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"aesthetic needs head=FILE"):
        build_reward("aesthetic", path=str(clip))


def test_aesthetic_head_round_trip(clip, head, tmp_path):
    file, net = head
    loaded = ri.load_aesthetic_head(file)
    e = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    torch.testing.assert_close(loaded(e), net(e))
    c = ri.load_clip(clip)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(build_reward("aesthetic", path=str(clip), head=str(file))(x, PROMPTS)[0],
                                   net(c.image_embeds(x)).squeeze(-1))
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="lacks layers.0.bias"):
        ri.convert_aesthetic_head(tmp_path / "bad.pth", tmp_path / "bad.safetensors")


def test_call_syntax_parses_yaml_scalars_and_paths():
    name, kw = _parse_call("aesthetic(path=/models/clip-vit-l.14, head = ~/m/a.safetensors, n=3, s=1e-4, on=true)")
    assert name == "aesthetic" and kw["path"] == "/models/clip-vit-l.14" and kw["head"].endswith("/m/a.safetensors")
    assert not kw["head"].startswith("~") and kw["n"] == 3 and kw["s"] == 1e-4 and kw["on"] is True
    assert _parse_call("clip-score(path='/a,b (c)', x=)") == ("clip-score", {"path": "/a,b (c)", "x": None})
    assert _parse_call("ink") == ("ink", {})
    with pytest.raises(ValueError, match="cannot parse the arguments"):
        _parse_call("ink(path)")


def test_call_syntax_in_weighted_sums_and_unknown_keywords(clip):
    r = build_reward(f"1.0*clip-score(path={clip}, scale=100)-0.1*brightness")
    assert r.name == "1.0*clip-score-0.1*brightness" and r.differentiable
    x = _images()
    total, info = r(x, PROMPTS)
    torch.testing.assert_close(total, info["clip-score"] - 0.1 * info["brightness"])
    cos = build_reward(f"clip-score(path={clip})")(x, PROMPTS)[0].detach()
    torch.testing.assert_close(info["clip-score"], 100 * cos)
    assert build_reward({f"clip-score(path={clip})": 2.0}).name == "2.0*clip-score"
    mixed = build_reward(f"clip-score(path={clip})-0.5*jpeg-compressibility")
    assert mixed.name == "1.0*clip-score-0.5*jpeg-compressibility" and not mixed.differentiable
    with pytest.raises(ValueError, match=r"reward 'clip-score' has no keyword argument hed.*accepts path, processor"):
        build_reward(f"clip-score(path={clip}, hed=/x)")
    with pytest.raises(ValueError, match=r"reward 'brightness' has no keyword argument path; it accepts none"):
        build_reward("0.5*ink+brightness(path=/x)")


def test_hpsv2_without_open_clip_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        build_reward(f"hpsv2(path={tmp_path / 'HPS_v2.1_compressed.pt'})")


class _FakeOpenClip(nn.Module):
    """Stands in for an open_clip model: the loader's wiring, not HPS itself."""

    def __init__(self):
        super().__init__()
        self.visual, self.text = nn.Linear(3, 8), nn.Embedding(128, 8)
        self.visual.preprocess_cfg = {"size": 16, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

    def encode_image(self, x):
        assert x.shape[-2:] == (16, 16)
        return self.visual(x.mean(dim=(2, 3)))

    def encode_text(self, tokens):
        return self.text(tokens).mean(1)


def test_hpsv2_loads_a_local_checkpoint_through_open_clip(monkeypatch, tmp_path):
    torch.manual_seed(0)
    ref = _FakeOpenClip()
    torch.save(ref.state_dict(), tmp_path / "hps.pt")

    def create_model(name, pretrained, device):
        assert pretrained is None  # diffalign loads the weights itself (weights_only), open_clip fetches nothing
        return _FakeOpenClip()  # another random init: the checkpoint must replace it

    tokenizer = lambda ps: torch.tensor([[ord(c) % 128 for c in p[:4].ljust(4)] for p in ps])  # noqa: E731
    fake = SimpleNamespace(create_model=create_model, get_tokenizer=lambda name: tokenizer)
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    with pytest.raises(FileNotFoundError, match="checkpoint .*nope.pt"):
        build_reward(f"hpsv2(path={tmp_path / 'nope.pt'})")
    x = _images().requires_grad_(True)
    r, _ = build_reward(f"hpsv2(path={tmp_path / 'hps.pt'}, model=ViT-B-32)")(x, PROMPTS)
    assert r.shape == (3,) and (r.abs() <= 1 + 1e-6).all()
    import torch.nn.functional as F

    xi = ri.resize_crop(x.detach(), 16, (16, 16), (0.5,) * 3, (0.5,) * 3)  # the loaded weights, not the random init
    want = (F.normalize(ref.encode_image(xi), dim=-1) * F.normalize(ref.encode_text(tokenizer(PROMPTS)), dim=-1)).sum(-1)
    torch.testing.assert_close(r.detach(), want.detach(), atol=1e-5, rtol=1e-5)
    r.sum().backward()
    assert x.grad.abs().sum() > 0
