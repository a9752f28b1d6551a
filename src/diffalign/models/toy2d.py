"""The embedded `toy2d` model: an MLP noise model on a fixed 2-D Gaussian mixture.

The data distribution is written down exactly (`MEANS`, `COVS`, `WEIGHTS`), so for
a reward r(x) the KL-regularised aligned optimum p*(x) ∝ p(x) exp(r(x) / beta) can
be computed (or sampled) in closed form and compared with what a method learns.
`log_prob(x)` gives the exact data log-density.

The model is unconditional: `encode_prompts` and `null_condition` return None,
`decode` is the identity, samples are points (N, 2).

The exact KL-regularised optimum for the quadratic reward (`tilted_mixture`,
`sample_optimum`, `distance_to_optimum`) lives here too, beside the mixture it is
computed from; the model's evaluation space reports the distance to it.
The first `load()` pretrains it (well under a minute) and caches it with
`cached_dir('toy2d', DEFAULT_CONFIG, ...)`; the folder holds `mlp/` (ModelMixin
save_pretrained, safetensors) and `scheduler/` (DDIMScheduler; FlowMatchEulerDiscreteScheduler for
`toy2d-flow`, the same mixture learned by flow matching).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..eval.metrics import random_directions, sliced_from_sorted, sliced_wasserstein, sorted_projections
from ..rewards.toy2d import SCALE, TARGET
from . import pretraining
from .base import DiffusionModel, EvalSpace, zero_output
from .embedded import Embedded

# Six components on a hexagon of radius 1.5, with different shapes and weights.
MEANS = torch.tensor(
    [
        [1.5, 0.0],
        [0.75, 1.299],
        [-0.75, 1.299],
        [-1.5, 0.0],
        [-0.75, -1.299],
        [0.75, -1.299],
    ]
)
COVS = torch.tensor(
    [
        [[0.040, 0.000], [0.000, 0.040]],
        [[0.060, 0.030], [0.030, 0.030]],
        [[0.020, 0.000], [0.000, 0.020]],
        [[0.030, 0.000], [0.000, 0.080]],
        [[0.050, -0.025], [-0.025, 0.040]],
        [[0.025, 0.000], [0.000, 0.025]],
    ]
)
WEIGHTS = torch.tensor([0.25, 0.10, 0.20, 0.15, 0.20, 0.10])

DEFAULT_CONFIG: dict = {
    "version": 2,  # 2: diffusers' EMAModel and warm-up + cosine schedule (1: hand-written, one step shifted)
    "hidden": 128,
    "n_blocks": 3,
    "time_dim": 64,
    "beta_schedule": "squaredcos_cap_v2",
    "num_train_timesteps": 1000,
    "steps_offset": 1,  # inference timesteps 951, 901, ..., 1: the final DDIM step keeps a nonzero std
    "steps": 3000,
    "batch_size": 512,
    "lr": 2e-3,
    "warmup": 100,
    "ema_decay": 0.995,
    "seed": 0,
    "threads": 1,  # tiny MLP: extra threads only add overhead
}

NUM_INFERENCE_STEPS = 20


def sample_data(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n points (n, 2) from the mixture."""
    comp = torch.multinomial(WEIGHTS, n, replacement=True, generator=generator)
    chol = torch.linalg.cholesky(COVS)  # (K, 2, 2)
    z = torch.randn(n, 2, generator=generator)
    return MEANS[comp] + torch.einsum("nij,nj->ni", chol[comp], z)


def log_prob(x: torch.Tensor) -> torch.Tensor:
    """Exact log-density of the mixture at points x (..., 2)."""
    dist = torch.distributions.MultivariateNormal(MEANS.to(x), covariance_matrix=COVS.to(x))
    comp_lp = dist.log_prob(x.unsqueeze(-2))  # (..., K)
    return torch.logsumexp(comp_lp + WEIGHTS.to(x).log(), dim=-1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of (B,) timesteps (ints or floats in [0, 1000))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ToyMLP(ModelMixin, ConfigMixin):
    """eps(x, t) for 2-D points: residual SiLU MLP with a sinusoidal time embedding
    added before every block."""

    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 128, n_blocks: int = 3, time_dim: int = 64):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(n_blocks)])
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.time_mlp(timestep_embedding(t, self.config.time_dim).to(x.dtype))
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(F.silu(h + temb))
        return self.out(F.silu(h))


def linear_names(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def make_scheduler(config: dict = DEFAULT_CONFIG):
    return pretraining.make_scheduler(config)


def make_net(config: dict = DEFAULT_CONFIG) -> ToyMLP:
    return ToyMLP(hidden=config["hidden"], n_blocks=config["n_blocks"], time_dim=config["time_dim"])


def training_batches(config: dict):
    """batch(generator) -> (x0, None): fresh mixture samples."""
    return lambda g: (sample_data(config["batch_size"], g), None)


def forward(net, x, t, cond):
    return net(x, t)


def pretrain(out_dir, config: dict = DEFAULT_CONFIG, progress: bool = True) -> dict:
    """Train the MLP on fresh mixture samples; save EMA weights to `out_dir/mlp` and the scheduler."""
    return TOY2D.pretrain(out_dir, config, progress)


def _build_model(folder: Path, net: ToyMLP, scheduler, name: str = "toy2d") -> DiffusionModel:
    net.eval().requires_grad_(False)
    return DiffusionModel(
        name=name,
        denoiser=net,
        scheduler=scheduler,
        sample_shape=(2,),
        encode_prompts=lambda prompts: None,
        forward=forward,
        decode=lambda x0: x0,
        image_encoder=lambda points: points,  # samples are the points themselves (feedback sets store them as .npy)
        null_condition=lambda n: None,
        prompts=[""],
        lora_targets=linear_names(net),
        guidance_scale=1.0,
        num_inference_steps=NUM_INFERENCE_STEPS,
        path=str(folder),
        eval_space=eval_space,
        make_field_net=lambda: zero_output(ToyMLP(hidden=64, n_blocks=2, time_dim=32)),
        info={"means": MEANS, "covs": COVS, "weights": WEIGHTS},
    )


def eval_space() -> EvalSpace:
    """The points themselves; real data = 20,000 exact draws of the mixture; no classes; with the
    quadratic reward also the distance to the exact optimum p* ∝ p_ref exp(r / beta)."""

    def extra(points, reward, beta: float) -> dict:
        fn = getattr(reward, "fn", None)
        if getattr(reward, "name", None) != "quadratic" or not hasattr(fn, "target"):
            return {}
        d = distance_to_optimum(points.cpu(), beta, target=fn.target, scale=fn.scale)
        return {"optimum_distance": d["distance"], "optimum_distance_sd": d["distance_sd"],
                "optimum_floor": d["floor"], "optimum_ratio": d["ratio"], "optimum_beta": beta,
                **distance_to_data(points.cpu())}

    return EvalSpace("toy2d", lambda x: x.float(), lambda: sample_data(20000, torch.Generator().manual_seed(0)),
                     description="the 2-D points", extra=extra)


# ---- the exact optimum -------------------------------------------------------------------------
# p_ref is the mixture sum_k w_k N(mu_k, S_k) and r(x) = -a ||x - c||^2. Then p*(x) ∝ p_ref(x) exp(r(x) / beta)
# is again a Gaussian mixture: exp(r/beta) is an unnormalised Gaussian N(c, (beta / 2a) I), and the product of
# two Gaussians is N(m_k, P_k) with P_k = (S_k^-1 + (2a/beta) I)^-1, m_k = P_k (S_k^-1 mu_k + (2a/beta) c),
# with weight w_k N(mu_k; c, S_k + (beta / 2a) I), renormalised.
def tilted_mixture(beta: float, target=TARGET, scale: float = SCALE, weights=None, means=None, covs=None):
    """(weights (K,), means (K, 2), covs (K, 2, 2)) of p* ∝ p_ref exp(r / beta), float64."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    w = (WEIGHTS if weights is None else weights).double()
    mu = (MEANS if means is None else means).double()
    S = (COVS if covs is None else covs).double()
    c = torch.as_tensor(target, dtype=torch.float64)
    lam = 2.0 * scale / beta  # precision of the tilt
    eye = torch.eye(mu.shape[1], dtype=torch.float64)
    S_inv = torch.linalg.inv(S)
    P = torch.linalg.inv(S_inv + lam * eye)
    m = torch.einsum("kij,kj->ki", P, torch.einsum("kij,kj->ki", S_inv, mu) + lam * c)
    marg = torch.distributions.MultivariateNormal(c.expand_as(mu), covariance_matrix=S + eye / lam)
    logw = w.log() + marg.log_prob(mu)
    return torch.softmax(logw, 0), m, P


def sample_optimum(n: int, beta: float, generator: torch.Generator | None = None, **kw) -> torch.Tensor:
    """n points (n, 2) from p*."""
    w, m, P = tilted_mixture(beta, **kw)
    comp = torch.multinomial(w, n, replacement=True, generator=generator)
    z = torch.randn(n, m.shape[1], generator=generator, dtype=torch.float64)
    return (m[comp] + torch.einsum("nij,nj->ni", torch.linalg.cholesky(P)[comp], z)).float()


def optimum_log_prob(x: torch.Tensor, beta: float, **kw) -> torch.Tensor:
    w, m, P = tilted_mixture(beta, **kw)
    dist = torch.distributions.MultivariateNormal(m, covariance_matrix=P)
    return torch.logsumexp(dist.log_prob(x.double().unsqueeze(-2)) + w.log(), -1)


YARDSTICK_DRAWS = 32  # independent draws of the reference sample averaged per distance (one draw moves it up to 2x)


def distance_to_optimum(points: torch.Tensor, beta: float, seed: int = 0, n_proj: int = 256,
                        draws: int = YARDSTICK_DRAWS, **kw) -> dict:
    """Sliced Wasserstein distance from `points` to a same-size sample of p*, averaged over `draws`
    independent samples (and projections), with its spread over them (`distance_sd`); the floor is
    the same distance between two independent samples of p* of that size, averaged likewise, and
    `ratio` = distance / floor."""
    plain = set(kw) <= {"target", "scale"}  # the yardsticks of the shipped mixture are cached
    key = ("optimum", beta, tuple(torch.as_tensor(kw.get("target", TARGET)).tolist()), kw.get("scale", SCALE)) \
        if plain else None
    out = yardstick_distance(points, lambda n, g: sample_optimum(n, beta, g, **kw), seed, n_proj, draws, key)
    return {"beta": beta, **out}


_YARDSTICKS: dict = {}  # key -> per draw (directions, sorted projections of draw a, floor)


def yardstick_distance(points, draw, seed: int, n_proj: int, draws: int, key=None) -> dict:
    """Mean (and sample sd) over `draws` of the distance of `points` to a fresh same-size draw a, and of
    the floor: a second draw b to a. Draw k uses generators seeded seed + 1000 k (the draws) and
    seed + 1000 k + 1 (the projections), so every model is measured against the same yardsticks.
    With a hashable `key` naming `draw`, the draws' side is computed once per size and reused."""
    if draws < 1:
        raise ValueError(f"the yardstick needs at least one draw, got draws={draws}")
    full = None if key is None else (*key, len(points), seed, n_proj, draws)
    refs = _YARDSTICKS.get(full) if full is not None else None
    if refs is None:
        refs = []
        for k in range(draws):
            g = torch.Generator().manual_seed(seed + 1000 * k)
            a, b = draw(len(points), g), draw(len(points), g)
            dirs = random_directions(a.shape[1], n_proj, torch.Generator().manual_seed(seed + 1000 * k + 1))
            pa = sorted_projections(a, dirs)
            refs.append((dirs, pa, sliced_from_sorted(sorted_projections(b, dirs), pa)))
        if full is not None:
            if len(_YARDSTICKS) >= 16:
                _YARDSTICKS.clear()
            _YARDSTICKS[full] = refs
    d = torch.tensor([sliced_from_sorted(sorted_projections(points, dirs), pa) for dirs, pa, _ in refs],
                     dtype=torch.float64)
    f = torch.tensor([floor for _, _, floor in refs], dtype=torch.float64)
    sd = float(d.std()) if draws > 1 else 0.0
    return {"distance": float(d.mean()), "distance_sd": sd, "floor": float(f.mean()),
            "ratio": float(d.mean() / f.mean()), "draws": draws}


def distance_to_data(points: torch.Tensor, seed: int = 0, n_proj: int = 256, draws: int = YARDSTICK_DRAWS) -> dict:
    """Distance from `points` to same-size samples of the mixture itself and its floor (two mixture
    samples), averaged as in `distance_to_optimum`: for the base model, its own fidelity, the practical
    limit of any aligned model's distance to p* at this n (as a ratio to the floor)."""
    out = yardstick_distance(points, sample_data, seed + 10, n_proj, draws, key=("data",))
    return {"data_distance": out["distance"], "data_floor": out["floor"], "data_ratio": out["ratio"]}


TOY2D = Embedded("toy2d", "mlp", ToyMLP, make_net, training_batches, forward, _build_model)


def load_from_folder(path) -> DiffusionModel:
    """Load a toy2d model saved as `<path>/mlp` + `<path>/scheduler` (e.g. your own fine-tune)."""
    return TOY2D.from_folder(path)


REWARDS = {"reward": "quadratic", "eval_reward": None}  # the exact optimum is the held-out yardstick
load = TOY2D.register("toy2d", "MLP noise model on a 2-D Gaussian mixture with a known aligned optimum (pretrained "
                      "on first use)", DEFAULT_CONFIG, **REWARDS)

# The same MLP trained as a rectified flow (velocity v = ε − x0, `diffalign.flow`), on the same
# mixture: the exact optimum p* is the same, so the toy2d yardstick applies to flow methods.
FLOW_CONFIG: dict = {**DEFAULT_CONFIG, "version": 1, "objective": "flow"}
load_flow = TOY2D.register("toy2d-flow", "the toy2d MLP trained as a rectified flow (flow matching) on the same "
                           "mixture, same exact optimum (pretrained on first use)", FLOW_CONFIG, **REWARDS)
