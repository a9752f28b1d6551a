"""Sample quality of the embedded flow models on the sampler's grid (docs/embedded.md).

    python scripts/flow_quality.py

digits-flow: the held-out classifier's accuracy on 50 samples of each digit (20 steps), by the ODE
(eta 0) and the SDE at a = 0.7, without guidance and at guidance 2.0; toy2d-flow: sliced W2 between
2,000 samples and 2,000 fresh data points, by the ODE and the SDE, and between two data sets (floor).
"""

import torch

from diffalign.models import load_model
from diffalign.models.toy2d import sample_data, sliced_wasserstein
from diffalign.rewards import build_reward
from diffalign.sampler import Sampler


@torch.no_grad()
def main() -> None:
    m = load_model("digits-flow")
    heldout = build_reward("classifier_heldout")
    prompts = [str(d) for d in range(10) for _ in range(50)]
    for eta in (0.0, 0.7):
        for g in (1.0, 2.0):
            s = Sampler(num_steps=20, eta=eta, guidance_scale=g)
            x = s.sample(m, prompts, generator=torch.Generator().manual_seed(0), with_logprob=False).final
            _, info = heldout(m.decode(x), prompts)
            print(f"digits-flow eta {eta} guidance {g}: held-out accuracy {100 * info['accuracy']:.1f}%")
    m = load_model("toy2d-flow")
    data = sample_data(2000, torch.Generator().manual_seed(1))
    floor = sliced_wasserstein(data, sample_data(2000, torch.Generator().manual_seed(2)),
                               generator=torch.Generator().manual_seed(3))
    for eta in (0.0, 0.7):
        x = Sampler(num_steps=20, eta=eta).sample(m, [""] * 2000, generator=torch.Generator().manual_seed(0),
                                                  with_logprob=False).final
        print(f"toy2d-flow eta {eta}: sliced W2 to data {sliced_wasserstein(x, data, generator=torch.Generator().manual_seed(3)):.3f} "
              f"(floor {floor:.3f})")


if __name__ == "__main__":
    main()
