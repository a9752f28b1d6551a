"""Run under `torchrun --nproc_per_node 2` by tests/test_train.py: the Trainer's gradient averaging on its own.

Rank r sets every denoiser gradient to (r + 1); rank 0 alone sets the flow network's to 4 (rank 1 leaves it
None). After `_average_gradients` each rank writes what it holds to OUT/rank-R.json."""

import json
import sys
from pathlib import Path

import torch

from diffalign.train import Trainer, resolve_config

out = Path(sys.argv[1])
cfg, args = resolve_config(base={"method": "nabla-gfn", "model": "toy2d", "reward": "quadratic", "prompts": [""],
                                 "sampling": {"num_steps": 4}, "eval": {"reward": None, "per_prompt": 2},
                                 "train": {"epochs": 1, "batch_size": 4, "batches_per_epoch": 1}})
tr = Trainer(cfg, args, out / "run")
rank = tr.run.rank
for p in tr.params["denoiser"]:
    p.grad = torch.full_like(p, float(rank + 1))
for p in tr.params["flow"]:
    p.grad = torch.full_like(p, 4.0) if rank == 0 else None
tr._average_gradients()
held = {name: sorted({float(v) for p in ps if p.grad is not None for v in p.grad.unique()}) for name, ps in
        tr.params.items()}
(out / f"rank-{rank}.json").write_text(json.dumps({"processes": tr.run.processes, **held}))
tr.acc.wait_for_everyone()  # neither rank leaves while the other still talks to it
torch.distributed.destroy_process_group()
