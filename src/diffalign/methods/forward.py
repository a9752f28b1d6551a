"""Forward-process online RL: DiffusionNFT (`nft`; Zheng et al., arXiv 2509.16117) and Advantage
Weighted Matching (`awm`; Xue et al., arXiv 2509.25050). METHODS-after-grpo.md §1–2.

Collect: deterministic rollouts (`sampling.eta: 0`: the ODE of a flow model, DDIM's eta-0 step; or
any diffusers solver, `sampling.scheduler: dpmsolver++ | unipc | euler | ddim` with `sampling.order`;
no log-probabilities, guidance 1 by default) of `group_size` samples per prompt, from the anchor
policy (NFT's "old" policy) or the current one; only the clean samples x0, their conditions and
the advantages are kept: A = (r − mean of the prompt's group) / (std of the whole batch + 1e-4), for a
weighted sum of rewards Σ w_k·A_k over its parts, each normalised on its own (`reward_norm: per-reward`).

Update: each sample is re-noised at a random subset of the model's own `num_steps` grid (a fraction
`timestep_fraction`; `timesteps: continuous`: as many times drawn over the whole training range),
fresh noise per sample and time, and the denoising loss is weighted:
- `nft`: NFT's implicit positive/negative policies of guidance strength `guidance_strength`
  around the anchor, weighted by the optimality probability r = ½ + clip(A)/(2·A_max), in x0 space
  with the public code's adaptive per-sample normalisation (`adaptive: true`) or as the plain
  prediction-space regression (`adaptive: false`, the paper's form);
- `awm`: AWM's surrogate log-likelihood ℓ = −w(t, mse) (`weighting`: ghuber p, uniform, t) in a
  PPO-clip wrapper at ratio 1, advantages clip(A)/A_max, plus `anchor_weight`·‖pred − pred_anchor‖².
Both: + `kl_weight`·‖pred − pred_base‖² (the frozen base; 0 = off).

The anchor is one copy of the trained weights (LoRA or all), the old policy of NFT and the EMA of
AWM: before each epoch's rollouts θ_anchor ← η·θ_anchor + (1−η)·θ with η = min(decay_rate·(s −
decay_start), decay_max) after s optimizer steps (0 before decay_start). It is checkpointed and
restored on resume; `final/` holds θ (no third, evaluation-only EMA).

Model kinds: the loss is written in the model's own prediction space (velocity for flow models,
target u = ε − x0; ε for DDIM models, target ε) and in x0 space through the scheduler's x0
conversion, which is affine in the prediction, so the implicit policies are the same in both. The
noise level t in AWM's weights is timestep / num_train_timesteps (flow: σ; DDIM: t/T).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..losses import denoising_error, ppo_clip_loss
from ..losses.forward import (WEIGHTINGS, awm_surrogate, decay, implicit_policies, nft_loss, optimality_probability,
                              proximal)
from ..losses.grpo import group_advantages
from ..sampling import add_noise, random_timesteps, training_target, x0_from_output
from ..sharding import reshard, shard_like, values, whole
from . import Method, Micro, register, register_variant
from .policy_gradient import sample_and_score


@dataclass
class Clean:
    """One epoch's clean samples on this process."""

    x0: torch.Tensor  # (N, *shape)
    cond: torch.Tensor | None  # (N, ...)
    advantages: torch.Tensor  # (N,) unclipped
    keys: torch.Tensor  # (N,) global sample indices
    epoch: int


@register
class DiffusionNFT(Method):
    name = "nft"
    description = "DiffusionNFT: implicit positive/negative policies on re-noised clean samples, no likelihoods (Zheng et al. 2025)"
    defaults = {"sampling.eta": 0.0, "sampling.guidance_scale": 1.0}

    @dataclass
    class Config:
        loss: str = "nft"  # 'nft' (implicit policies) or 'awm' (advantage-weighted surrogate)
        group_size: int = 4  # samples per prompt; train.batch_size must be a multiple of it
        adv_clip: float = 5.0  # A_max: advantages clipped to ±A_max (NFT: r = 1/2 + A/(2 A_max); AWM: A/A_max)
        guidance_strength: float = 1.0  # NFT's β: v± = v_anchor ± β (v − v_anchor) (not a KL weight)
        adaptive: bool = True  # NFT: x0-space loss over its own detached mean |error| (public code); false: plain
        weighting: str = "ghuber"  # AWM: ghuber (t/p)(mse^p), uniform, or t
        p: float = 0.25  # AWM's ghuber exponent
        clip_range: float = 1.0  # AWM's PPO clip on the (on-policy) ratio
        anchor_weight: float = 0.0  # ‖pred − pred_anchor‖² weight (AWM's β_ema; NFT's proximal term is built in)
        kl_weight: float = 1e-4  # ‖pred − pred_base‖² weight (NFT's train.beta; 0 = off)
        decay_rate: float = 0.001  # anchor decay η = min(decay_rate·(s − decay_start), decay_max) after s steps
        decay_max: float = 0.5
        decay_start: int = 0
        sample_with: str = "anchor"  # rollouts from 'anchor' (NFT's old policy) or 'current'
        timestep_fraction: float = 0.9  # fraction of the sampler's grid times trained per sample
        timesteps: str = "grid"  # 'grid': the model's own num_steps grid (the papers); 'continuous': any t (`sampling.random_timesteps`)
        minibatches: int = 1  # optimizer steps per epoch
        reward_norm: str = "per-reward"  # weighted-sum rewards: 'per-reward' (each part normalised, then summed) or 'total'

        def validate(self, where):
            checks = [(self.loss in ("nft", "awm"), "loss", "must be 'nft' or 'awm'"),
                      (self.group_size >= 2, "group_size", "must be >= 2"),
                      (self.adv_clip > 0 and self.guidance_strength > 0, "adv_clip", "and guidance_strength must be > 0"),
                      (self.weighting in WEIGHTINGS, "weighting", f"must be one of {', '.join(WEIGHTINGS)}"),
                      (self.p > 0 and self.clip_range > 0, "p", "and clip_range must be > 0"),
                      (self.anchor_weight >= 0 and self.kl_weight >= 0, "kl_weight", "and anchor_weight must be >= 0"),
                      (0 <= self.decay_max < 1 and self.decay_rate >= 0, "decay_max", "must be in [0, 1)"),
                      (self.sample_with in ("anchor", "current"), "sample_with", "must be 'anchor' or 'current'"),
                      (0 < self.timestep_fraction <= 1, "timestep_fraction", "must be in (0, 1]"),
                      (self.timesteps in ("grid", "continuous"), "timesteps", "must be 'grid' or 'continuous'"),
                      (self.minibatches >= 1, "minibatches", "must be >= 1"),
                      (self.reward_norm in ("per-reward", "total"), "reward_norm", "must be 'per-reward' or 'total'")]
            for ok, key, message in checks:
                if not ok:
                    raise ValueError(f"config key '{where}.{key}' {message}")

    def __init__(self, run, args: Config):
        self.run, self.args = run, args
        self.sampler = run.sampler
        if run.cfg.train.batch_size % args.group_size:
            raise ConfigError(f"train.batch_size = {run.cfg.train.batch_size} is not a multiple of args.group_size = "
                              f"{args.group_size}: every prompt is sampled group_size times")
        if args.kl_weight > 0:
            run.keep_reference()
        self.anchor: dict[str, torch.Tensor] | None = None  # laid out as the parameters (sharded under FSDP)
        self._scratch: dict[str, torch.Tensor] | None = None  # the trained weights while the anchor is in
        self.steps = 0

    # ---- the anchor ------------------------------------------------------------------------
    def _trained(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.run.model.denoiser.named_parameters() if p.requires_grad}

    def _update_anchor(self) -> float:
        """θ_anchor ← η·θ_anchor + (1−η)·θ (a copy of θ at the first call); returns η."""
        a = self.args
        if self.anchor is None:
            self.anchor = {n: p.detach().clone() for n, p in self._trained().items()}
            return 0.0
        eta = decay(self.steps, a.decay_rate, a.decay_max, a.decay_start)
        with torch.no_grad():
            for n, p in self._trained().items():
                self.anchor[n].mul_(eta).add_(p.detach(), alpha=1 - eta)
        return eta

    @contextlib.contextmanager
    def anchored(self):
        """Inside, the denoiser holds the anchor's weights: copied in place (a sharded parameter stays the
        storage FSDP gathers from) and the trained ones restored on exit, before any backward, so a graph
        built before (the current prediction) differentiates the trained weights."""
        reshard(self.run.model.denoiser)  # sharded: the parameters are the shards FSDP gathers from
        params = self._trained()
        if self._scratch is None:
            self._scratch = {n: torch.empty_like(values(p)) for n, p in params.items()}
        for n, p in params.items():  # on the values: autograd's version counters stay as they are
            self._scratch[n].copy_(values(p))
            values(p).copy_(values(self.anchor[n]))
        try:
            yield
        finally:
            reshard(self.run.model.denoiser)  # no gathered copy of the anchor outlives the context
            for n, p in params.items():
                values(p).copy_(self._scratch[n])

    # ---- collect -----------------------------------------------------------------------------
    def collect(self, epoch: int):
        run, a = self.run, self.args
        eta = self._update_anchor()
        n, G = run.cfg.train.batch_size, a.group_size
        policy = self.anchored() if a.sample_with == "anchor" else contextlib.nullcontext()
        with policy:
            scored = sample_and_score(run, self.sampler, epoch, "forward", with_logprob=False,
                                      draw=lambda b: [p for p in run.draw_prompts(epoch, b, n=n // G) for _ in range(G)])
        per_reward = a.reward_norm == "per-reward"
        adv, _ = group_advantages(scored.parts if per_reward else scored.rewards, G, global_std=True,
                                  weights=run.meter.part_weights if per_reward else None)
        x0 = scored.traj.final
        batch = Clean(x0, scored.traj.cond, adv[scored.keys].to(run.device), scored.keys, epoch)
        metrics = {"reward_mean": float(scored.rewards.mean()), "reward_std": float(scored.rewards.std()),
                   "x0_norm": float(run.dist.mean(x0.float().pow(2).mean().view(1).cpu())), "anchor_decay": eta}
        return batch, metrics

    # ---- update ------------------------------------------------------------------------------
    def micro_steps(self, batch: Clean):
        run, a = self.run, self.args
        grid = self.sampler.timesteps(run.model)
        n_train = max(1, int(len(grid) * a.timestep_fraction))
        n_all = run.cfg.train.batch_size * run.cfg.train.batches_per_epoch
        g = run.generator("forward-steps", batch.epoch)
        if a.timesteps == "grid":  # n_train distinct grid times per sample
            times = grid.cpu()[torch.stack([torch.randperm(len(grid), generator=g)[:n_train] for _ in range(n_all)])]
        else:
            times = random_timesteps(run.model.scheduler, n_all * n_train, g).view(n_all, n_train)
        times = times[batch.keys].to(run.device)
        eps = torch.stack([torch.randn((n_train, *batch.x0.shape[1:]), generator=run.generator(
            "forward-noise", batch.epoch, int(k))) for k in batch.keys]).to(batch.x0.device) if len(batch.keys) else None
        for share in run.minibatches(batch.keys, a.minibatches, g):
            for j in range(n_train):
                t = times[share.rows.to(times.device), j]
                yield Micro(self._loss(batch, share, t, eps[share.rows.to(eps.device), j]), share, accumulate=n_train)

    def _loss(self, batch: Clean, share, t, eps):
        def compute():
            run, a, m = self.run, self.args, self.run.model
            rows = share.rows.to(batch.x0.device)
            x0, adv = batch.x0[rows], batch.advantages[rows]
            cond = None if batch.cond is None else batch.cond[rows]
            s = m.scheduler
            x_t, target = add_noise(s, x0, eps, t), training_target(s, x0, eps, t)
            pred = m.predict_noise(x_t, t, cond)
            with torch.no_grad(), self.anchored():
                old = m.predict_noise(x_t, t, cond)
            if a.loss == "nft":
                per, info = self._nft(pred, old, x_t, t, x0, target, adv)
            else:
                level = t.float() / s.config.num_train_timesteps
                surrogate = awm_surrogate(denoising_error(pred, target), level, a.weighting, a.p)
                per, info = ppo_clip_loss(surrogate, surrogate.detach(), adv.clamp(-a.adv_clip, a.adv_clip) / a.adv_clip,
                                          a.clip_range)
                per = per.float() + a.anchor_weight * proximal(pred, old)
            if a.kl_weight > 0:
                with torch.no_grad(), run.reference():
                    base = m.predict_noise(x_t, t, cond)
                kl = proximal(pred, base)
                per, info["kl"] = per + a.kl_weight * kl, kl.mean().detach()
            loss = share.mean(per)
            return loss, {"loss": loss.detach(), "old_deviate": proximal(pred, old).mean().detach(), **info}

        return compute

    def _nft(self, pred, old, x_t, t, x0, target, adv):
        a, s = self.args, self.run.model.scheduler
        if a.adaptive:  # x0 space: x̂0 is affine in the prediction
            pred, old, target = x0_from_output(s, pred, t, x_t), x0_from_output(s, old, t, x_t), x0
        pos, neg = implicit_policies(pred, old, a.guidance_strength)
        return nft_loss(pos, neg, target, optimality_probability(adv, a.adv_clip), a.guidance_strength, a.adv_clip,
                        a.adaptive)

    def on_optimizer_step(self) -> None:
        self.steps += 1

    def state_dict(self) -> dict:
        """The anchor whole (gathered from the shards under FSDP: every process calls this)."""
        return {"steps": self.steps, "anchor": {n: whole(v).cpu() for n, v in (self.anchor or {}).items()}}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.steps = state["steps"]
            params = self._trained()
            self.anchor = {n: shard_like(v, params[n].detach()) for n, v in state["anchor"].items()} or None


@dataclass
class AWMConfig(DiffusionNFT.Config):
    """AWM's published choices (config/dgx_awm.py): its surrogate, an EMA anchor, current-policy rollouts."""

    loss: str = "awm"  # the advantage-weighted surrogate
    anchor_weight: float = 1.0  # β_ema: ‖pred − pred_ema‖² (the authors' "EMA as reference")
    kl_weight: float = 1e-3  # β_ref to the base (GenEval config)
    decay_max: float = 0.3  # EMA decay min(0.001·s, 0.3)
    sample_with: str = "current"  # AWM samples with the current policy
    timestep_fraction: float = 0.45  # 6 of 14 grid times in the paper's configs


register_variant(DiffusionNFT, name="awm", Config=AWMConfig,
                 description="AWM: the pretraining denoising loss on clean samples weighted by advantages, EMA anchor "
                             "(Xue et al. 2025)")
