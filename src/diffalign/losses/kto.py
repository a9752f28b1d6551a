"""Diffusion-KTO (Li, Kallidromitis, Gokul, Kato & Kozuka, "Aligning Diffusion Models by Optimizing Human
Utility", NeurIPS 2024, arXiv 2404.04465; METHODS.md §6): Kahneman–Tversky utility on per-sample labels.

With g = the sample's implicit log-ratio (Diffusion-KTO: e_ref - e_θ, the paper's form,
without DPO's factor 1/2), w = +1 (desirable) / -1 (undesirable) and the reference point
z = max(0, mean g over the whole batch) (detached: the KL estimate):

    utility "sigmoid" (the paper's):        loss = λ_w · (1 - σ(w·β·(g - z)))
    utility "loss-averse" (our decision):   loss = -λ_w · log σ(w·β·(g - z))

The log-sigmoid saturates for gains but keeps growing (linearly) for losses, so samples
on the wrong side of the reference point are never ignored.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

UTILITIES = ("sigmoid", "loss-averse")


def kto_reference_point(logratio: torch.Tensor, gather: Callable | None = None) -> torch.Tensor:
    """z = max(0, mean of g over the batch), detached; `gather` collects g from every process
    first (the batch is global, as in the reference code)."""
    g = logratio.detach()
    if gather is not None:
        g = gather(g)
    return g.mean().clamp(min=0)


def kto_loss(logratio, desirable, beta: float, ref_point, lambda_d: float = 1.0, lambda_u: float = 1.0,
             utility: str = "sigmoid"):
    """Per-sample loss and diagnostics; `desirable` is a bool tensor, `ref_point` z (a number or 0-d tensor)."""
    if utility not in UTILITIES:
        raise ValueError(f"unknown KTO utility {utility!r}: use 'sigmoid' or 'loss-averse'")
    g = logratio
    z = torch.as_tensor(ref_point, dtype=g.dtype, device=g.device).detach()
    w = desirable.to(g.dtype) * 2 - 1
    lam = torch.where(desirable, torch.as_tensor(lambda_d, dtype=g.dtype, device=g.device),
                      torch.as_tensor(lambda_u, dtype=g.dtype, device=g.device))
    x = w * beta * (g - z)
    per = lam * (1 - torch.sigmoid(x)) if utility == "sigmoid" else -lam * F.logsigmoid(x)
    info = {"kl_ref_point": z, "g_mean": g.mean().detach(), "desirable_frac": desirable.float().mean().detach()}
    return per, info
