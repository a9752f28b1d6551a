"""The run context: global minibatches over processes, models by name, moving every part."""


import pytest
import torch

from diffalign.context import Run
from diffalign.methods import resolve_config
from diffalign.processes import Processes, Share
from tiny_models import tiny_model


class Simulated(Processes):
    """Process `rank` of P, without torch.distributed: gathering returns every process's items."""

    def __init__(self, rank: int, P: int, everything: torch.Tensor):
        super().__init__(None)
        self.count, self.index, self.everything = P, rank, everything

    def gather_any(self, t):
        return self.everything


def _process(rank: int, everything: torch.Tensor, P: int):
    """Process `rank` of P holding the keys everything[rank::P]."""
    return Simulated(rank, P, everything), everything[rank::P]


@pytest.mark.parametrize("P, n_items, n", [(1, 10, 4), (2, 10, 4), (3, 7, 3), (2, 3, 8), (4, 5, 2)])
def test_global_minibatches_are_shared_out_over_processes(P, n_items, n):
    everything = torch.randperm(100, generator=torch.Generator().manual_seed(n_items))[:n_items]  # any unique ids
    # what one process holding everything would do
    single, _ = _process(0, everything, 1)
    want = single.minibatches(everything, n, torch.Generator().manual_seed(7))
    assert len(want) == min(n, n_items) and all(len(s) > 0 for s in want)  # never an empty minibatch
    values = torch.randn(n_items)
    for j, global_share in enumerate(want):
        parts, total = [], 0.0
        for rank in range(P):
            proc, keys = _process(rank, everything, P)
            share = proc.minibatches(keys, n, torch.Generator().manual_seed(7))[j]
            assert share.size == len(global_share) and share.processes == P
            parts.append(keys[share.rows])
            if len(share):  # the loop averages gradients over processes: (1/P) sum of the shares' losses
                total += float(share.mean(values[torch.isin(everything, keys)][share.rows])) / P
        got = torch.cat(parts)
        assert sorted(got.tolist()) == sorted(everything[global_share.rows].tolist())  # the same items ...
        assert total == pytest.approx(float(values[global_share.rows].mean()), rel=1e-5)  # ... the same mean


def test_minibatches_on_one_process_are_randperm_chunks_in_order():
    proc, keys = _process(0, torch.arange(12), 1)
    shares = proc.minibatches(keys, 4, torch.Generator().manual_seed(3))
    want = torch.randperm(12, generator=torch.Generator().manual_seed(3)).chunk(4)
    assert [s.rows.tolist() for s in shares] == [w.tolist() for w in want]
    assert Share(torch.arange(3), 3, 1).mean(torch.tensor([1.0, 2.0, 6.0])).item() == 3.0
    with pytest.raises(ValueError, match="unique"):
        Processes.single().minibatches(torch.tensor([1, 1]), 2, torch.Generator())


def test_each_process_owns_its_consecutive_rows():
    x = torch.arange(12) * 10
    parts = [Simulated(r, 3, None) for r in range(3)]
    assert [p.own(x).tolist() for p in parts] == [[0, 10, 20, 30], [40, 50, 60, 70], [80, 90, 100, 110]]
    assert [p.positions(12).tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert parts[1].own(list("abcdef")) == ["c", "d"]
    assert torch.equal(Processes.single().own(x), x) and Processes.single().part is None and parts[2].part == 2
    with pytest.raises(ValueError, match="'train.batch_size' = 7 is not divisible by the 3 processes"):
        parts[0].check_divisible(7, "train.batch_size")


def test_slots_hold_the_same_samples_for_any_number_of_processes():
    """Batch b's slot on process r: prompts drawn by (epoch, b), rows r·B.., keys b·n + position, and each
    sample's generator seeded by its global position, so two processes' slots together are one process's."""
    from diffalign.seeding import Seeds

    prompts = ["a", "b", "c"]
    one = Seeds(5, Processes.single(), prompts).slots(3, "sample", n=4, batches=2)
    halves = [Seeds(5, Simulated(rank, 2, None), prompts).slots(3, "sample", n=4, batches=2) for rank in range(2)]
    assert one[0].prompts != one[1].prompts  # drawn by (epoch, batch)
    for b, whole in enumerate(one):
        assert whole.index == b and whole.keys.tolist() == [4 * b + i for i in range(4)]
        assert halves[0][b].prompts == halves[1][b].prompts == whole.prompts
        assert halves[0][b].local + halves[1][b].local == whole.local
        assert torch.cat([h[b].keys for h in halves]).tolist() == whole.keys.tolist()
        draws = [torch.randn(1, generator=g) for h in halves for g in h[b].generators]
        assert torch.equal(torch.cat(draws), torch.cat([torch.randn(1, generator=g) for g in whole.generators]))


def test_the_reward_meter_counts_every_processes_queries():
    from diffalign.context import RewardMeter

    meter = RewardMeter(lambda images, prompts, metadata: (images.sum(1).double(), {}), processes=2)
    r = meter.score(torch.ones(3, 2), ["a", "b", "c"])
    assert r.dtype == torch.float32 and r.tolist() == [2.0, 2.0, 2.0] and meter.queries == 6


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
