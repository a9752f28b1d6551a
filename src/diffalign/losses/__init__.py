"""Loss functions, one small module each, composed by the methods.

Every loss returns `(per_item, info)`: the loss of each sample or pair (a tensor of
shape (N,)) and a dict of detached diagnostics. Methods reduce `per_item` over the
items of a minibatch (`Share.mean` spreads a global minibatch over processes), so the
same function serves one process or many. Each is tested on hand-worked values in
`tests/test_losses.py`.

- `ppo_clip_loss` — DDPO and GRPO: clipped surrogate on per-step ratios.
- `group_advantages`, `step_kl` — GRPO: advantages within groups of one prompt, the closed-form
  KL of a Gaussian step to the reference's (`grpo.py`).
- `dpo_loss` — D3PO, SPO, TailorPO (step log-ratios) and Diffusion-DPO (log-ratios
  from denoising errors), with optional clipping of the log-ratio.
- `kto_loss`, `kto_reference_point` — Diffusion-KTO.
- `denoising_error` — per-sample mean squared error of a model output against its target.
- `gaussian_scores`, `residual_db_loss` — ∇-GFlowNet's residual ∇-DB (`nabla_db.py`).
- `constrained.dual_step`, `constrained.lagrangian` — primal-dual constrained training
  (plain and resilient dual steps; the resilient factor derived there).
"""

from .denoising import denoising_error
from .dpo import dpo_loss, logratio_from_errors
from .grpo import group_advantages, step_kl
from .kto import kto_loss, kto_reference_point
from .nabla_db import gaussian_scores, residual_db_loss
from .ppo import ppo_clip_loss

__all__ = ["denoising_error", "dpo_loss", "gaussian_scores", "group_advantages", "kto_loss", "kto_reference_point",
           "logratio_from_errors", "ppo_clip_loss", "residual_db_loss", "step_kl"]
