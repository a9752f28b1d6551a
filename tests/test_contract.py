"""The contract every method passes: every registered method, and a method with a second
module (tests/extra_module_method.py). A new method file gets this test for free.

For each: one epoch on toy2d (digits for methods that learn from an image feedback file)
moves its weights with finite losses; checkpoint -> kill -> resume ends with the same
weights of every module and the same method state as an uninterrupted run; its rollouts,
`diffalign eval` and `diffalign sample` all draw through the method's own sampler."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffalign.data import feedback
from diffalign.methods import get_method, list_methods, sampler_of
from diffalign.sampler import Sampler
from diffalign.train import resolve_config, train

METHODS = [name for name, _ in list_methods()] + ["extra_module_method:ValueBaseline"]
TOY = {"model": "toy2d", "reward": "quadratic", "prompts": [""], "train": {"batch_size": 8, "batches_per_epoch": 1},
       "eval": {"reward": None, "per_prompt": 16}, "optim": {"lr": 1e-3}}
DIGITS = {"model": "digits", "reward": "classifier", "prompts": ["1", "7"], "sampling": {"num_steps": 6},
          "train": {"batch_size": 8, "batches_per_epoch": 2}, "eval": {"reward": None, "per_prompt": 4}}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from diffalign.models import load_model
    from diffalign.rewards import build_reward

    out = tmp_path_factory.mktemp("pairs")
    feedback.make_pairs(load_model("digits", progress=False), build_reward("classifier"), ["1", "7"], 16, out,
                        sampler=Sampler(num_steps=6))
    return str(out / "pairs.jsonl")


def _spec(name: str, pairs: str) -> dict:
    if getattr(get_method(name), "offline_data", False):
        small = {"particles": 2, "continuation_steps": 2} if name.startswith("ddo") else {}  # a cheap Doob sampler
        return dict(DIGITS, method=name, args={"data": pairs, **small})
    return dict(TOY, method=name)


def _counting_sampler(cls, monkeypatch) -> list:
    """Wrap every new instance's sampler in a score correction that counts its calls (and adds
    nothing to the method's own correction, if it has one)."""
    calls, original = [], cls.__init__

    def init(self, run, args):
        original(self, run, args)
        s = sampler_of(self, run)
        own = s.correction

        def counted(model, x, t, cond):
            calls.append(1)
            return own(model, x, t, cond) if own else torch.zeros_like(x)

        self.sampler = s.replace(correction=counted)

    monkeypatch.setattr(cls, "__init__", init)
    return calls


def _checkpoint(run_dir, epoch: int) -> dict:
    ck = run_dir / "checkpoints" / f"epoch-{epoch:06d}"
    out = {f"modules/{p.name}": load_file(str(p)) for p in (ck / "modules").iterdir()}
    if (ck / "method.safetensors").exists():
        out["method.safetensors"] = load_file(str(ck / "method.safetensors"))
    out["state"] = json.loads((ck / "state.json").read_text())
    return out


@pytest.mark.parametrize("name", METHODS)
def test_method_contract(tmp_path, name, pairs, monkeypatch):
    from diffalign.eval import evaluate_run, sample_run

    calls = _counting_sampler(get_method(name), monkeypatch)
    cfg, args = resolve_config(base=dict(_spec(name, pairs), train={**_spec(name, pairs)["train"], "epochs": 2}))

    full = train(cfg, args, tmp_path / "full")
    assert full["finished"] and calls, "training must sample through the method's sampler"
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r) and any("loss" in r for r in rows)
    end = _checkpoint(tmp_path / "full", 2)

    # checkpoint -> kill -> resume: a run stopped after its first checkpoint, continued by a new process
    assert not train(cfg, args, tmp_path / "part", max_epochs=1)["finished"]
    first = _checkpoint(tmp_path / "part", 1)
    assert train(cfg, args, tmp_path / "part", resume=True)["finished"]
    resumed = _checkpoint(tmp_path / "part", 2)
    moved = [k for k in end if k.startswith("modules/") and any(not torch.equal(t, first[k][n]) for n, t in end[k].items())]
    assert moved, "an epoch of training moved no module's weights"
    assert resumed.keys() == end.keys()
    for key in end:
        if key == "state":
            assert resumed[key]["method"] == end[key]["method"] and resumed[key]["epoch"] == 2
            continue
        assert resumed[key].keys() == end[key].keys()
        for n in end[key]:
            assert torch.equal(resumed[key][n], end[key][n]), (key, n)

    # the aligned model is (weights, the method's sampler): what eval and sample draw with
    calls.clear()
    e = evaluate_run(tmp_path / "full", per_prompt=2)
    assert calls and e["aligned"]["n"] == 2 * len(cfg.prompts or [""])
    calls.clear()
    sample_run(tmp_path / "full", tmp_path / "s", n=2)
    assert calls
