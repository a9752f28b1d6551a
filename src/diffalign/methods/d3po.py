"""D3PO (Yang et al. 2024): trajectory-level preference applied at every step (METHODS.md §2).

Two trajectories per prompt start from the same x_T (one `latents` tensor passed to
both samples, different noise generators). The final images are ranked by the
training reward; that one label is applied to every denoising step: the pair at
step i is (x_i^w -> x_{i+1}^w, x_i^l -> x_{i+1}^l), conditions *different* after the
first step. Loss per step: the clipped DPO loss `losses.dpo_loss` (β 0.1, ε 0.1 as the paper).
Ties (equal rewards) give no pair.

Decisions: `sampling.logprob: mean` (the reference implementation averages the
per-element log-prob; its β and ε assume that scale). Reference log-probs are computed
at collect time under `run.reference()` (frozen base). The trained steps
(`timestep_fraction`) are one random subset per batch, or one per pair
(`per_sample_timesteps: true`, as the reference code), drawn from the run seed.

Human labels (`args.labels: DIR`): instead of the reward, a person chooses between the
two final samples, one round per epoch (`diffalign.data.human`): the run writes the
round's pairs, stops, and trains on them once labels.json is there and it is resumed;
`diffalign label DIR/epoch-NNNN` serves a page that writes labels.json.
No reward is queried for training then.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import human
from . import Method, register
from .preference import PairsBatch, PreferenceConfig, StepPairs, make_pairs, pair_keys, pair_metrics, pair_micro_steps, with_reference


@register
class D3PO(Method):
    name = "d3po"
    description = "D3PO: two trajectories from one x_T ranked by the reward, clipped DPO loss at every step (Yang et al. 2024)"
    requires_logprob = True
    requires_reference = True
    defaults = {"sampling.logprob": "mean", "optim.lr": 3e-5}

    @dataclass
    class Config(PreferenceConfig):
        timestep_fraction: float = 1.0  # fraction of the steps whose pairs are trained
        per_sample_timesteps: bool = False  # one random subset of steps per pair (reference code) vs per batch
        labels: str = ""  # folder of human label rounds (see diffalign.data.human); "" = rank by the reward

        def validate(self, where):
            super().validate(where)
            if not 0 < self.timestep_fraction <= 1:
                raise ValueError(f"config key '{where}.timestep_fraction' must be in (0, 1]")

    def __init__(self, run, args: Config):
        self.run, self.args = run, args
        self.sampler = run.sampler

    def collect(self, epoch: int):
        run, cfg, s = self.run, self.run.cfg, self.sampler
        n = cfg.train.batch_size
        pairs, rewards, unlabelled = [], [], []
        for slot in run.slots(epoch, "d3po-xT"):
            b, local = slot.index, slot.local
            x_T = s.noise(run.model, len(local), slot.generators)
            a = s.sample(run.model, local, generator=run.sample_generators("d3po-a", epoch, b, n_global=n),
                         latents=x_T.clone())
            c = s.sample(run.model, local, generator=run.sample_generators("d3po-b", epoch, b, n_global=n),
                         latents=x_T.clone())
            if self.args.labels:
                rows = self.label_rows(epoch, slot)
                labels = self.labels_file(epoch)
                if not labels.exists():  # the round covers every batch of the epoch: gather, write once below
                    unlabelled.append((rows, run.model.decode(a.final), run.model.decode(c.final)))
                    continue
                a_wins, keep = human.read_labels(labels, rows)
            else:
                ra = run.score(run.model.decode(a.final), local)
                rb = run.score(run.model.decode(c.final), local)
                rewards += [ra, rb]
                a_wins, keep = ra > rb, ra != rb
            a_wins, keep = a_wins.to(run.device), keep.to(run.device)
            T = a.num_steps
            sel = lambda u, v: torch.where(a_wins.view(-1, *[1] * (u.ndim - 1)), u, v)  # noqa: E731
            rows = torch.arange(len(local), device=run.device)
            for steps in self.trained_steps(epoch, b, T):
                i = run.own(steps).to(run.device)
                pairs.append(make_pairs(sel(a.latents[rows, i], c.latents[rows, i]),
                                        sel(c.latents[rows, i], a.latents[rows, i]),
                                        sel(a.latents[rows, i + 1], c.latents[rows, i + 1]),
                                        sel(c.latents[rows, i + 1], a.latents[rows, i + 1]),
                                        a.timesteps.to(run.device)[i], a.cond, pair_keys(slot, i, T), keep))
        if unlabelled:
            self.ask_for_labels(epoch, unlabelled)
        pairs = with_reference(run, s, StepPairs.cat(pairs))
        return PairsBatch(pairs, epoch), pair_metrics(run, pairs, torch.cat(rewards) if rewards else None)

    def trained_steps(self, epoch: int, batch: int, T: int) -> list[torch.Tensor]:
        """The steps whose pairs are trained, as a list of (global batch,) step indices: one subset
        for the whole batch, or one per sample (`per_sample_timesteps`), seeded by the run seed."""
        g = self.run.generator("d3po-steps", epoch, batch)
        n_train = max(1, int(round(T * self.args.timestep_fraction)))
        n = self.run.cfg.train.batch_size
        if self.args.per_sample_timesteps:
            per = torch.stack([torch.randperm(T, generator=g)[:n_train].sort().values for _ in range(n)])
            return list(per.T)
        return [torch.full((n,), int(i)) for i in torch.randperm(T, generator=g)[:n_train].sort().values]

    def micro_steps(self, batch: PairsBatch):
        return pair_micro_steps(self.run, self.sampler, batch.pairs, self.args, self.name, batch.epoch)

    def labels_file(self, epoch: int):
        return human.round_dir(self.args.labels, epoch) / "labels.json"

    def label_rows(self, epoch, slot) -> list[dict]:
        """This process's pairs of one batch: prompt and the two image ids."""
        return [{"prompt": p, "a": ia, "b": ib}
                for p, (ia, ib) in zip(slot.local, human.image_ids(epoch, slot.index, slot.positions.tolist()))]

    def ask_for_labels(self, epoch, unlabelled):
        """Write the epoch's round (all batches) and stop the run until labels.json exists."""
        run = self.run
        labels = self.labels_file(epoch)
        rows = [r for rs, _, _ in unlabelled for r in rs]
        total = run.cfg.train.batch_size * run.cfg.train.batches_per_epoch
        human.write_round(labels.parent, rows, torch.cat([x for _, x, _ in unlabelled]),
                          torch.cat([x for _, _, x in unlabelled]), part=run.dist.part)
        if run.dist.is_main:
            human.write_round_info(labels.parent, run.out, epoch, total)
        done = human.answered(labels.parent)
        raise human.LabelsNeeded(
            f"epoch {epoch}: {total} pairs to label in {labels.parent}"
            f"{f' ({done} answered so far)' if done else ''}. Label them in the browser with "
            f"`diffalign label {labels.parent}` (it writes {labels.name} once every pair is answered), or write "
            f'{labels} by hand as a JSON list [{{"prompt": ..., "a": ..., "b": ..., "choice": "a" | "b" | "tie"}}, '
            f"...]; then resume the run with `diffalign train --resume {run.out}`")
