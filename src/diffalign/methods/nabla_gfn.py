"""∇-GFlowNet with residual ∇-DB (Liu, Xiao, Liu, Bengio & Zhang, "Efficient Diversity-Preserving Diffusion
Alignment via Gradient-Informed GFlowNets", ICLR 2025, arXiv 2412.07775; METHODS.md §7).

Target: p*(x_0) ∝ p_ref(x_0)·R(x_0)^β, learned without collapsing diversity. Per epoch:

1. collect: sample trajectories with the current model; pick about `train_fraction` of
   each trajectory's transitions (always the last one, plus one random step per block of
   the others); for each, compute the reward scores β·γ·∇ log R(x0_hat(·)) at x_{t-1}
   and x_t (each sample scored with its own prompt; at x_0 the reward itself, γ = 1),
   and with the frozen reference a_ref and b_ref;
2. update: the residual ∇-DB loss (`losses.nabla_db`) on the policy's a_θ and b_θ (b_θ by
   autograd with create_graph, so the reverse term reaches the LoRA *and* g_φ), the flow
   network g_φ at x_{t-1} and x_t, plus the output regulariser λ·mean||out_θ − out_sampled||²
   (the model output stored at sampling time: a trust region around the sampling policy).

Decisions:
- γ_t = ā_t (the paper's; `gamma: sqrt_alpha_bar` for √ā_t).
- log R: `log_reward: reward` uses the reward as log R (right for rewards that are log
  probabilities or log-scale scores: the digits classifier, toy2d's quadratic); `log`
  uses log(reward) for a positive reward (an error names a non-positive one).
- g_φ is `model.make_field_net()`: a small time- and prompt-conditioned network with the
  sample's shape as output, zero at initialisation, its own learning rate and weight
  decay (`flow_lr`, `flow_weight_decay`), called like the denoiser.
- Reward queries: every reward-gradient evaluation on one image counts, 2 per trained
  transition; the sample's own reward comes with the gradient at x_0 (the last transition
  is always trained), so a sample costs 2·(trained transitions) queries.
- Two departures from the paper, both measured on toy2d (docs/results/nabla-gfn.md) and both
  leaving the fixed point where it is:
  - x0_hat for the reward term comes from the frozen reference (`x0_from: reference`).
    The flow it approximates, log E_ref[R^β | x_t], is an expectation under the
    reference's posterior, so the reference's x0_hat is the right plug-in, and it is a
    fixed function: with the policy's x0_hat (`x0_from: policy`, the paper's) the target
    moves with θ, and on toy2d runs at β ≥ 2 diverged (loss → inf within 16 epochs).
  - Residual weights (`weighting`). Scores scale as 1/σ, so in the plain sum of squares
    (`none`, the paper's) the last, nearly noiseless transitions outweigh the early ones
    by up to 1/σ⁴ and the early steps, where the tilt towards R^β is decided, barely learn
    (toy2d: the model hardly moved). `split` (default) weights the policy's gradient by σ²
    and leaves g_φ's unweighted; `sigma2` weights both.
- The sampler is plain: the aligned model is the fine-tuned denoiser alone.
- Unlike the public code: every sample's reward uses its own prompt, the loop takes
  exactly one optimizer step per update, and the reverse term is differentiated with
  create_graph (there it never reached the policy).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .. import adapters
from ..config import ConfigError
from ..losses.nabla_db import gaussian_scores, residual_db_loss
from ..sampling import alpha_bar
from ..seeding import seed_for
from ..trajectory import Rows, Trajectory
from . import Method, Micro, Trainable, register


def twice_differentiable():
    """Attention kernels whose backward is itself differentiable (b_θ is differentiated with
    create_graph): the fused flash/efficient kernels have no double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def math_checkpoint(block, *args, **kwargs):
    """Gradient checkpointing of one block whose forward and recomputation both run under
    `twice_differentiable` (the attention of UNets, SD3's and FLUX's transformers alike)."""
    from torch.utils.checkpoint import checkpoint

    def run(*a, **k):
        with twice_differentiable():
            return block(*a, **k)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


@dataclass
class Transitions(Rows):
    """N trained transitions x_t -> x_prev on this process, with everything the loss needs."""

    x_t: torch.Tensor  # (N, *shape)
    x_prev: torch.Tensor  # (N, *shape)
    t: torch.Tensor  # (N,) timestep of x_t
    t_prev: torch.Tensor  # (N,) timestep of x_prev (0 for x_0)
    cond: torch.Tensor | None
    terminal: torch.Tensor  # (N,) bool: x_prev is x_0
    output: torch.Tensor  # (N, *shape) the model output at sampling time
    a_ref: torch.Tensor
    b_ref: torch.Tensor
    reward_prev: torch.Tensor  # β γ ∇ log R(x0_hat(x_prev))
    reward_t: torch.Tensor  # β γ ∇ log R(x0_hat(x_t))
    keys: torch.Tensor  # (N,) global ids (CPU)


@dataclass
class Batch:
    transitions: Transitions
    epoch: int


@register
class NablaGFN(Method):
    name = "nabla-gfn"
    description = "∇-GFlowNet: residual ∇-DB, fine-tunes towards p_ref·R^β while keeping diversity (Liu et al. 2025)"
    second_order = True  # the loss holds ∇ₓ log p_θ (create_graph): no FSDP
    requires_logprob = True
    requires_reference = True
    requires_differentiable_reward = True
    defaults = {"optim.lr": 1e-3}

    @dataclass
    class Config:
        beta: float = 1.0  # reward temperature: the target is p_ref · R^beta
        log_reward: str = "reward"  # 'reward': the reward is log R; 'log': log R = log(reward), reward > 0
        gamma: str = "alpha_bar"  # weight γ_t of the reward term in the residual flow: alpha_bar or sqrt_alpha_bar
        reverse_weight: float = 1.0  # weight of the reverse (x_t) term
        x0_from: str = "reference"  # model whose x0_hat the reward is scored at: reference (fixed prior) or policy (the paper's)
        weighting: str = "split"  # residual weights: split (σ² for the policy, 1 for g_φ), sigma2 (σ² both), none (the paper's)
        output_reg: float = 100.0  # λ of the output regulariser λ·mean||out_θ − out_sampled||²
        flow_lr: float = 1e-3  # learning rate of the flow network g_φ
        flow_weight_decay: float = 1e-2  # its weight decay
        train_fraction: float = 0.1  # transitions trained per trajectory: the last, plus one per block
        inner_epochs: int = 1  # passes over each epoch's transitions
        minibatches: int = 1  # optimizer steps per inner epoch

        def validate(self, where):
            if self.log_reward not in ("reward", "log"):
                raise ValueError(f"config key '{where}.log_reward' must be 'reward' or 'log'")
            if self.weighting not in ("split", "sigma2", "none"):
                raise ValueError(f"config key '{where}.weighting' must be 'split', 'sigma2' or 'none'")
            if self.x0_from not in ("reference", "policy"):
                raise ValueError(f"config key '{where}.x0_from' must be 'reference' or 'policy'")
            if self.gamma not in ("alpha_bar", "sqrt_alpha_bar"):
                raise ValueError(f"config key '{where}.gamma' must be 'alpha_bar' or 'sqrt_alpha_bar'")
            if not 0 < self.train_fraction <= 1:
                raise ValueError(f"config key '{where}.train_fraction' must be in (0, 1]")
            if self.beta <= 0 or self.output_reg < 0 or self.reverse_weight < 0:
                raise ValueError(f"config keys '{where}.beta' (> 0), 'output_reg', 'reverse_weight' (>= 0) out of range")

    def __init__(self, run, args: Config):
        self.run, self.args = run, args
        self.sampler = run.sampler
        if run.model.make_field_net is None:
            raise ConfigError(f"method '{self.name}' needs a flow network, but model '{run.cfg.model}' has no "
                              "make_field_net: add one to the model")
        torch.manual_seed(seed_for(run.cfg.seed, "flow-init"))  # the same on every process and run
        self.flow = run.model.make_field_net().to(run.device)
        den = adapters.unwrap(run.model.denoiser)
        if run.cfg.train.gradient_checkpointing and hasattr(den, "enable_gradient_checkpointing"):
            # a checkpointed block recomputes its forward inside the backward passes, where the kernel choice of
            # `twice_differentiable` no longer holds: the blocks run (and rerun) under it themselves
            den.enable_gradient_checkpointing(gradient_checkpointing_func=math_checkpoint)

    def modules(self):
        return {"denoiser": Trainable(self.run.model.denoiser),
                "flow": Trainable(self.flow, lr=self.args.flow_lr, weight_decay=self.args.flow_weight_decay)}

    # ---- collect ------------------------------------------------------------------------
    def trained_steps(self, epoch: int, batch: int, T: int) -> torch.Tensor:
        """(global batch, n) step indices per sample: the last step, plus one random step in each of
        n − 1 blocks of the others (n = round(train_fraction · T), at least 1)."""
        n = max(1, int(round(self.args.train_fraction * T)))
        g = self.run.generator("nabla-steps", epoch, batch)
        blocks = torch.tensor_split(torch.arange(T - 1), n - 1) if n > 1 else []
        picks = [torch.stack([blk[torch.randint(len(blk), (1,), generator=g)][0]
                              for blk in blocks]) if blocks else torch.empty(0, dtype=torch.long)
                 for _ in range(self.run.cfg.train.batch_size)]
        return torch.stack([torch.cat([p, torch.tensor([T - 1])]) for p in picks])

    def _gamma(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a = alpha_bar(self.run.model.scheduler, t.clamp(min=0), x)  # flow models: the VP equivalent
        return a if self.args.gamma == "alpha_bar" else a.sqrt()

    def reward_score(self, x, t, terminal, cond, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """(β γ_t ∇_x log R(x0_hat(x)), the reward of x0_hat): x0_hat from the model `x0_from` names
        (x itself where terminal, γ = 1). One reward query per sample: the gradient comes with the value."""
        run, s = self.run, self.sampler
        which = run.reference() if self.args.x0_from == "reference" else contextlib.nullcontext()
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            with which:  # the backward too: a checkpointed UNet recomputes its forward with the same adapters
                x0 = s.x0_hat(run.model, x, t.clamp(min=0), cond)
                x0 = torch.where(terminal.view(-1, *[1] * (x.ndim - 1)), x, x0)
                reward = run.score(run.model.decode(x0), prompts)
                log_r = reward
                if self.args.log_reward == "log":
                    if bool((reward <= 0).any()):
                        raise ValueError(f"args.log_reward: log needs a positive reward, but '{run.reward.name}' gave "
                                         f"{float(reward.min().detach()):.4g}: use log_reward: reward for a log-scale "
                                         "reward")
                    log_r = reward.log()
                (grad,) = torch.autograd.grad(log_r.sum(), x)
        gamma = torch.where(terminal.view(-1, *[1] * (x.ndim - 1)), torch.ones_like(grad), self._gamma(t, x))
        return self.args.beta * gamma * grad, reward.detach()

    def reference_scores(self, x_t, t, cond, x_prev):
        """a_ref and b_ref of the frozen base at this transition. b_ref is differentiated exactly as
        the policy's b_θ (create_graph, then detached): backward kernels differ in the last bits with
        and without create_graph, and θ = reference must give b_θ = b_ref exactly."""
        run, s = self.run, self.sampler
        with torch.enable_grad(), run.reference(), twice_differentiable():
            x = x_t.detach().requires_grad_(True)
            step = s.step(run.model, x, t, cond, prev_sample=x_prev, with_logprob=False)
            a, b = gaussian_scores(step.mean, step.std, x_prev, x, create_graph=True)
        return a.detach(), b.detach()

    def collect(self, epoch: int):
        run, s = self.run, self.sampler
        n, T = run.cfg.train.batch_size, s.num_steps
        items, rewards = [], []
        for slot in run.slots(epoch, "nabla"):
            b, local = slot.index, slot.local
            traj: Trajectory = s.sample(run.model, local, generator=slot.generators, with_logprob=False)
            steps = run.own(self.trained_steps(epoch, b, T)).to(run.device)
            rows = torch.arange(len(local), device=run.device)
            ts = traj.timesteps.to(run.device)
            ts_next = torch.cat([ts[1:], torch.zeros(1, dtype=ts.dtype, device=ts.device)])
            for j in range(steps.shape[1]):
                i = steps[:, j]
                x_t, x_prev, t, t_prev = traj.latents[rows, i], traj.latents[rows, i + 1], ts[i], ts_next[i]
                terminal = i == T - 1
                a_ref, b_ref = self.reference_scores(x_t, t, traj.cond, x_prev)
                score_prev, reward_prev = self.reward_score(x_prev, t_prev, terminal, traj.cond, local)
                score_t, _ = self.reward_score(x_t, t, torch.zeros_like(terminal), traj.cond, local)
                if j == steps.shape[1] - 1:  # the terminal transition: x_prev is x_0, its reward the sample's
                    rewards.append(reward_prev)
                items.append(Transitions(
                    x_t, x_prev, t, t_prev, traj.cond, terminal, traj.outputs[rows, i], a_ref, b_ref,
                    score_prev, score_t, (b * steps.shape[1] + j) * n + slot.positions))
        g = run.gather(torch.cat(rewards)).cpu()
        return Batch(Transitions.cat(items), epoch), {"reward_mean": float(g.mean()), "reward_std": float(g.std())}

    # ---- update ---------------------------------------------------------------------------
    def _weights(self, std: torch.Tensor, n: int):
        """(policy weight, flow weight) per transition: see `weighting` (std does not depend on θ)."""
        if self.args.weighting == "none":
            return None, None
        var = std.detach().pow(2).reshape(len(std), -1)[:, 0].expand(n)  # std is (N, 1, ...)
        return var, (var if self.args.weighting == "sigma2" else None)

    def micro_steps(self, batch: Batch):
        for inner in range(self.args.inner_epochs):
            g = self.run.generator("nabla-perm", batch.epoch, inner)
            for share in self.run.minibatches(batch.transitions.keys, self.args.minibatches, g):
                yield Micro(self._loss(batch.transitions.select(share.rows), share), share)

    def _loss(self, tr: Transitions, share):
        def compute():
            s, m = self.sampler, self.run.model
            x_t = tr.x_t.detach().requires_grad_(True)
            with twice_differentiable():
                out = s.predict(m, x_t, tr.t, tr.cond)
            step = s.step(m, x_t, tr.t, tr.cond, prev_sample=tr.x_prev, with_logprob=False, output=out)
            a, b = gaussian_scores(step.mean, step.std, tr.x_prev, x_t, create_graph=True)
            flow_prev = m.forward(self.flow, tr.x_prev, tr.t_prev, tr.cond)
            flow_t = m.forward(self.flow, tr.x_t, tr.t, tr.cond)
            per, info = residual_db_loss(a, tr.a_ref, b, tr.b_ref, tr.reward_prev, tr.reward_t, flow_prev, flow_t,
                                         tr.terminal, self.args.reverse_weight, *self._weights(step.std, len(a)))
            reg = (out - tr.output).pow(2).flatten(1).mean(1)
            loss = share.mean(per + self.args.output_reg * reg)
            return loss, {"loss": loss.detach(), "output_reg": reg.mean().detach(), **info}

        return compute
