"""D3PO (Yang et al. 2024): trajectory-level preference applied at every step (METHODS.md §2).

Two trajectories per prompt start from the same x_T (one `latents` tensor passed to
both samples, different noise generators). The final images are ranked by the
training reward; that one label is applied to every denoising step: the pair at
step i is (x_i^w -> x_{i+1}^w, x_i^l -> x_{i+1}^l), conditions *different* after the
first step. Loss per step: `preference.clipped_dpo_loss` (β 0.1, ε 0.1 as the paper).
Ties (equal rewards) give no pair.

Decisions: `sampling.logprob: mean` (the reference implementation averages the
per-element log-prob; its β and ε assume that scale). Reference log-probs are computed
at collect time under `trainer.reference()` (frozen base).

Human labels (`args.labels: DIR`): instead of the reward, a person chooses between the
two final samples, one round per epoch (`diffalign.data.human`): the run writes the
round's pairs, stops, and trains on them once labels.json is there and it is resumed.
No reward is queried for training then.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import human
from . import register
from .preference import Pairs, PreferenceConfig, PreferenceMethod, make_pairs, pair_metrics


@register
class D3PO(PreferenceMethod):
    name = "d3po"
    description = "D3PO: two trajectories from one x_T ranked by the reward, clipped DPO loss at every step (Yang et al. 2024)"
    defaults = {"sampling.logprob": "mean", "optim.lr": 3e-5}

    @dataclass
    class Config(PreferenceConfig):
        timestep_fraction: float = 1.0  # fraction of the steps whose pairs are trained
        labels: str = ""  # folder of human label rounds (see diffalign.data.human); "" = rank by the reward

        def validate(self, where):
            super().validate(where)
            if not 0 < self.timestep_fraction <= 1:
                raise ValueError(f"config key '{where}.timestep_fraction' must be in (0, 1]")

    def collect(self, epoch: int):
        from diffusers.utils.torch_utils import randn_tensor

        t, cfg = self.t, self.t.cfg
        n = cfg.train.batch_size
        pairs, rewards, unlabelled = [], [], []
        for b in range(cfg.train.batches_per_epoch):
            prompts = t.draw_prompts(epoch, b, n=n)
            local = prompts[t.local_slice(n)]
            x_T = randn_tensor((len(local), *t.model.sample_shape), device=t.device,
                               generator=t.sample_generators("d3po-xT", epoch, b, n_global=n))
            a = self.sample(local, t.sample_generators("d3po-a", epoch, b, n_global=n), latents=x_T.clone())
            c = self.sample(local, t.sample_generators("d3po-b", epoch, b, n_global=n), latents=x_T.clone())
            if self.args.labels:
                rows = self.label_rows(epoch, b, local)
                labels = self.labels_file(epoch)
                if not labels.exists():  # the round covers every batch of the epoch: gather, write once below
                    unlabelled.append((rows, t.model.decode(a.final), t.model.decode(c.final)))
                    continue
                a_wins, keep = human.read_labels(labels, rows)
            else:
                ra = t.score(t.model.decode(a.final), local)
                rb = t.score(t.model.decode(c.final), local)
                rewards += [ra, rb]
                a_wins, keep = ra > rb, ra != rb
            a_wins, keep = a_wins.to(t.device), keep.to(t.device)
            T = a.num_steps
            g = torch.Generator().manual_seed(epoch * 1000 + b)
            n_train = max(1, int(round(T * self.args.timestep_fraction)))
            steps = torch.randperm(T, generator=g)[:n_train].sort().values.tolist()
            sel = lambda u, v: torch.where(a_wins.view(-1, *[1] * (u.ndim - 1)), u, v)
            for i in steps:
                pairs.append(make_pairs(sel(a.latents[:, i], c.latents[:, i]), sel(c.latents[:, i], a.latents[:, i]),
                                        sel(a.latents[:, i + 1], c.latents[:, i + 1]),
                                        sel(c.latents[:, i + 1], a.latents[:, i + 1]),
                                        a.timesteps[i], a.cond, keep))
        if unlabelled:
            self.ask_for_labels(epoch, unlabelled)
        pairs = self.add_reference(Pairs.cat(pairs))
        return {"pairs": pairs, "epoch": epoch}, pair_metrics(pairs, torch.cat(rewards) if rewards else None, t)

    def labels_file(self, epoch: int):
        return human.round_dir(self.args.labels, epoch) / "labels.json"

    def label_rows(self, epoch, batch, prompts) -> list[dict]:
        """This process's pairs of one batch: prompt and the two image ids."""
        sl = self.t.local_slice(self.t.cfg.train.batch_size)
        return [{"prompt": p, "a": ia, "b": ib}
                for p, (ia, ib) in zip(prompts, human.image_ids(epoch, batch, range(sl.start, sl.stop)))]

    def ask_for_labels(self, epoch, unlabelled):
        """Write the epoch's round (all batches) and stop the run until labels.json exists."""
        t = self.t
        labels = self.labels_file(epoch)
        rows = [r for rs, _, _ in unlabelled for r in rs]
        human.write_round(labels.parent, t.acc.process_index, t.acc.num_processes, rows,
                          torch.cat([x for _, x, _ in unlabelled]), torch.cat([x for _, _, x in unlabelled]))
        raise human.LabelsNeeded(
            f"epoch {epoch}: {t.cfg.train.batch_size * t.cfg.train.batches_per_epoch} pairs to label in "
            f"{labels.parent} (pairs{'' if t.acc.num_processes == 1 else '-*'}.json, images in img/). Write {labels} "
            'as a JSON list [{"prompt": ..., "a": ..., "b": ..., "choice": "a" | "b" | "tie"}, ...] and resume the '
            f"run with `diffalign train --resume {t.out}`")
