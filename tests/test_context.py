"""The run context: global minibatches over processes, models by name, moving every part."""

from types import SimpleNamespace

import pytest
import torch

from diffalign.context import Run, Share
from diffalign.methods import resolve_config
from tiny_models import tiny_model


def _process(rank: int, everything: torch.Tensor, P: int):
    """A stand-in for process `rank` of P holding the keys everything[rank::P]."""
    return SimpleNamespace(processes=P, gather_any=lambda keys: everything), everything[rank::P]


@pytest.mark.parametrize("P, n_items, n", [(1, 10, 4), (2, 10, 4), (3, 7, 3), (2, 3, 8), (4, 5, 2)])
def test_global_minibatches_are_shared_out_over_processes(P, n_items, n):
    everything = torch.randperm(100, generator=torch.Generator().manual_seed(n_items))[:n_items]  # any unique ids
    # what one process holding everything would do
    single, _ = _process(0, everything, 1)
    want = Run.minibatches(single, everything, n, torch.Generator().manual_seed(7))
    assert len(want) == min(n, n_items) and all(len(s) > 0 for s in want)  # never an empty minibatch
    values = torch.randn(n_items)
    for j, global_share in enumerate(want):
        parts, total = [], 0.0
        for rank in range(P):
            self, keys = _process(rank, everything, P)
            share = Run.minibatches(self, keys, n, torch.Generator().manual_seed(7))[j]
            assert share.size == len(global_share) and share.processes == P
            parts.append(keys[share.rows])
            if len(share):  # the loop averages gradients over processes: (1/P) sum of the shares' losses
                total += float(share.mean(values[torch.isin(everything, keys)][share.rows])) / P
        got = torch.cat(parts)
        assert sorted(got.tolist()) == sorted(everything[global_share.rows].tolist())  # the same items ...
        assert total == pytest.approx(float(values[global_share.rows].mean()), rel=1e-5)  # ... the same mean


def test_minibatches_on_one_process_are_randperm_chunks_in_order():
    self, keys = _process(0, torch.arange(12), 1)
    shares = Run.minibatches(self, keys, 4, torch.Generator().manual_seed(3))
    want = torch.randperm(12, generator=torch.Generator().manual_seed(3)).chunk(4)
    assert [s.rows.tolist() for s in shares] == [w.tolist() for w in want]
    assert Share(torch.arange(3), 3, 1).mean(torch.tensor([1.0, 2.0, 6.0])).item() == 3.0
    with pytest.raises(ValueError, match="unique"):
        Run.minibatches(SimpleNamespace(processes=1, gather_any=lambda k: k), torch.tensor([1, 1]), 2,
                        torch.Generator())


def test_a_model_registered_outside_the_package_runs_by_name(tmp_path):
    """No model names are special: a model registered by a test file trains and evaluates."""
    from diffalign.eval import evaluate
    from diffalign.eval.core import sample_metrics

    cfg, args = resolve_config(base={"method": "ddpo", "model": "tiny-test", "reward": "ink", "sampling": {"num_steps": 3},
                                     "eval": {"reward": None, "per_prompt": 2}, "train": {"batch_size": 4}})
    run = Run(cfg)
    assert run.model.name == "tiny" and run.prompts == ["0", "1", "2"] and run.sampler.guidance_scale == 2.0
    res = evaluate(run, run.sampler)
    assert res["n"] == 6 and "diversity" not in res  # no evaluation space: rewards only
    assert sample_metrics(run.model, torch.rand(2, 1, 4, 4), ["0", "0"]) == {}
    with pytest.raises(ValueError, match="unknown model 'tiny-tset'.*Did you mean 'tiny-test'"):
        Run(resolve_config(base=dict(cfg.to_dict(), model="tiny-tset"))[0])


def test_model_to_moves_every_part():
    m = tiny_model()
    m.parts["vae"] = torch.nn.Linear(2, 2)
    m.to("meta")
    assert m.device.type == "meta" and m.parts["vae"].weight.device.type == "meta"
