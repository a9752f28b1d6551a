"""The embedded `toy2d` model: an MLP noise model on a fixed 2-D Gaussian mixture.

The data distribution is written down exactly (`MEANS`, `COVS`, `WEIGHTS`), so for
a reward r(x) the KL-regularised aligned optimum p*(x) ∝ p(x) exp(r(x) / beta) can
be computed (or sampled) in closed form and compared with what a method learns.
`log_prob(x)` gives the exact data log-density.

The model is unconditional: `encode_prompts` and `null_condition` return None,
`decode` is the identity, samples are points (N, 2).
The first `load()` pretrains it (well under a minute) and caches it with
`cached_dir('toy2d', DEFAULT_CONFIG, ...)`; the folder holds `mlp/` (ModelMixin
save_pretrained, safetensors) and `scheduler/` (DDIMScheduler).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..cache import cached_dir
from .base import DiffusionModel

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
    "version": 1,
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
REQUIRED_FILES = ("mlp/config.json", "mlp/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json")


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


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 128, generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance between point clouds a (n, d) and b (m, d).

    Averages the squared 1-D W2 distance over `n_proj` random directions and returns
    its square root. Unequal sizes are compared through quantiles.
    """
    a = a.detach().float().cpu().flatten(1)
    b = b.detach().float().cpu().flatten(1)
    dirs = torch.randn(a.shape[1], n_proj, generator=generator)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = (a @ dirs).sort(dim=0)
    pb, _ = (b @ dirs).sort(dim=0)
    if pa.shape[0] != pb.shape[0]:
        m = max(pa.shape[0], pb.shape[0])
        q = (torch.arange(m, dtype=torch.float32) + 0.5) / m
        pa = torch.quantile(pa, q, dim=0)
        pb = torch.quantile(pb, q, dim=0)
    return float((pa - pb).pow(2).mean().sqrt())


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
    from diffusers import DDIMScheduler

    # The last DDIM step must keep a nonzero std so its log-prob exists: with
    # set_alpha_to_one=False it goes to alphas_cumprod[0], and steps_offset=1 makes it
    # start from t=1 (with the default offset 0 it would start at t=0 and have std 0).
    # 'leading' spacing (first step t=951): 'trailing' would start at t=999, where
    # the cosine schedule's alpha_bar ~ 2e-9 makes the x0 estimate blow up eps errors.
    return DDIMScheduler(
        num_train_timesteps=config["num_train_timesteps"],
        beta_schedule=config["beta_schedule"],
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=config["steps_offset"],
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def pretrain(out_dir, config: dict = DEFAULT_CONFIG, progress: bool = True) -> dict:
    """Train the MLP on fresh mixture samples; save EMA weights to `out_dir/mlp` and the scheduler."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(config["threads"], old_threads)))
    start = time.time()
    try:
        torch.manual_seed(config["seed"])
        gen = torch.Generator().manual_seed(config["seed"])
        net = ToyMLP(hidden=config["hidden"], n_blocks=config["n_blocks"], time_dim=config["time_dim"])
        net.train()
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        params, ema_params = list(net.parameters()), list(ema.parameters())
        scheduler = make_scheduler(config)
        alphas_cumprod = scheduler.alphas_cumprod.float()
        opt = torch.optim.AdamW(params, lr=config["lr"], weight_decay=0.0)
        steps, warmup = config["steps"], config["warmup"]

        def lr_factor(step):
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        bs = config["batch_size"]
        bar = tqdm(range(steps), desc="pretraining toy2d MLP (first use only)", disable=not progress)
        running = None
        for step in bar:
            x0 = sample_data(bs, gen)
            t = torch.randint(0, config["num_train_timesteps"], (bs,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            a = alphas_cumprod[t].unsqueeze(-1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            loss = F.mse_loss(net(xt, t), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            decay = min(config["ema_decay"], (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if step % 50 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{running:.4f}")
        out_dir.mkdir(parents=True, exist_ok=True)
        ema.save_pretrained(out_dir / "mlp", safe_serialization=True)
        scheduler.save_pretrained(out_dir / "scheduler")
        return {"final_loss": running, "seconds": time.time() - start}
    finally:
        torch.set_num_threads(old_threads)


def _build_model(folder: Path, net: ToyMLP, scheduler) -> DiffusionModel:
    net.eval().requires_grad_(False)
    return DiffusionModel(
        name="toy2d",
        denoiser=net,
        scheduler=scheduler,
        sample_shape=(2,),
        encode_prompts=lambda prompts: None,
        forward=lambda denoiser, x, t, cond: denoiser(x, t),
        decode=lambda x0: x0,
        null_condition=lambda n: None,
        prompts=[""],
        lora_targets=linear_names(net),
        guidance_scale=1.0,
        num_inference_steps=NUM_INFERENCE_STEPS,
        path=str(folder),
        info={"means": MEANS, "covs": COVS, "weights": WEIGHTS},
    )


def _load(folder: Path, fix: str) -> DiffusionModel:
    from diffusers import DDIMScheduler

    if not folder.is_dir():
        raise FileNotFoundError(f"toy2d model folder {str(folder)!r} does not exist; {fix}")
    for rel in REQUIRED_FILES:
        if not (folder / rel).is_file():
            raise FileNotFoundError(f"toy2d model folder {str(folder)!r} is missing {rel!r}; {fix}")
    try:
        net = ToyMLP.from_pretrained(folder / "mlp", use_safetensors=True)
        scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    except Exception as e:  # corrupt weights / config
        raise RuntimeError(f"could not load the toy2d model from {str(folder)!r} ({type(e).__name__}: {e}); {fix}") from e
    return _build_model(folder, net, scheduler)


def load_from_folder(path) -> DiffusionModel:
    """Load a toy2d model saved as `<path>/mlp` + `<path>/scheduler` (e.g. your own fine-tune)."""
    folder = Path(path).expanduser()
    fix = (
        "pass a folder holding 'mlp/' (ToyMLP.save_pretrained) and 'scheduler/' "
        "(DDIMScheduler.save_pretrained), or use load() for the embedded pretrained model"
    )
    return _load(folder, fix)


def load(progress: bool = True) -> DiffusionModel:
    """The embedded toy2d model, pretrained (well under a minute) and cached on first use."""
    folder = cached_dir("toy2d", DEFAULT_CONFIG, lambda p: pretrain(p, DEFAULT_CONFIG, progress=progress))
    fix = f"the cache entry looks corrupt: delete the folder {str(folder)!r} and call load() again to re-pretrain"
    return _load(folder, fix)
