"""Deterministic ODE solvers from diffusers for rollouts that need no likelihood (`sampling.scheduler`).

The forward-process methods (`nft`, `awm`) and evaluation can sample with any of diffusers' solvers
instead of the model's own Gaussian step; the solver is built from the model's scheduler config
(its training noise schedule, and for flow models its shift):

| name | DDIM / ε-prediction models | flow-matching models |
|---|---|---|
| `ddim` | `DDIMScheduler`, eta 0 (= `sampling.eta: 0` of the own step) | refused: on a flow model DDIM's eta-0 step is the Euler step, use `euler` |
| `euler` | `EulerDiscreteScheduler` (Karras-style σ, the input scaled by `scale_model_input`) | `FlowMatchEulerDiscreteScheduler` on diffalign's grid (= the own ODE at eta 0) |
| `dpmsolver++` | `DPMSolverMultistepScheduler`, `algorithm_type: dpmsolver++`, `solver_order: order` | the same with `use_flow_sigmas`, `prediction_type: flow_prediction`, `flow_shift` = the scheduler's shift |
| `unipc` | `UniPCMultistepScheduler`, `solver_order: order` | the same with flow sigmas |

A multistep solver keeps state between steps, so each `solve` builds a fresh one. The states it
records are the solver's own (for `euler` on a DDIM model: x scaled by sqrt(1 + σ²)); the last is the
sample. No step has a log-probability and no score correction (DDO's Doob transform) applies.
"""

from __future__ import annotations

from typing import Callable

import torch

from .config import SOLVERS
from .flow import is_flow
from .flow import set_timesteps as flow_grid


def build(scheduler, name: str, order: int = 2):
    """A fresh diffusers solver `name` for the model whose scheduler is `scheduler`."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)

    if name not in SOLVERS:
        raise ValueError(f"unknown sampling.scheduler {name!r}: choose one of {', '.join(SOLVERS)} "
                         "(or null for the model's own step)")
    if order not in (1, 2, 3):
        raise ValueError(f"sampling.order must be 1, 2 or 3, got {order}")
    config = dict(scheduler.config)
    if is_flow(scheduler):
        if getattr(scheduler.config, "use_dynamic_shifting", False):
            raise ValueError("this flow scheduler uses dynamic (resolution-dependent) shifting: the solvers need a "
                             "fixed `shift`; fix it to the image size with `diffalign.flow.image_shift` (pipeline "
                             "folders are fixed when loaded)")
        flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": float(scheduler.shift)}
        if name == "ddim":
            raise ValueError("sampling.scheduler 'ddim' is for ε-prediction models: on a flow model DDIM's eta-0 step "
                             "is the Euler step, so use 'euler' (or 'dpmsolver++' / 'unipc' for a higher order)")
        if name == "euler":
            return FlowMatchEulerDiscreteScheduler.from_config(config)
        if name == "dpmsolver++":
            return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=order,
                                                           **flow)
        return UniPCMultistepScheduler.from_config(config, solver_order=order, **flow)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=order)
    return UniPCMultistepScheduler.from_config(config, solver_order=order)


def solve(solver, num_steps: int, latents: torch.Tensor, predict: Callable, device=None):
    """Integrate from `latents` (standard normal) with `solver` in `num_steps` steps; `predict(x, t, i)`
    is the model output at step i. Returns (timesteps, states (T + 1 tensors), outputs (T))."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(solver, FlowMatchEulerDiscreteScheduler):
        flow_grid(solver, num_steps, device)
    else:
        solver.set_timesteps(num_steps, device=device)
    x = latents * getattr(solver, "init_noise_sigma", 1.0)
    scale = getattr(solver, "scale_model_input", lambda x_, t_: x_)  # the flow Euler scheduler has none
    states, outputs = [x], []
    for i, t in enumerate(solver.timesteps):
        out = predict(scale(x, t), t, i)
        x = solver.step(out.to(x.dtype), t, x, return_dict=False)[0]
        states.append(x)
        outputs.append(out)
    return solver.timesteps, states, outputs
