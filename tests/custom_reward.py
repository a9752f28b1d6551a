"""User-style rewards loaded by tests/test_rewards.py through 'custom_reward:<name>' specs."""

import torch


def make_brightness(device="cpu", scale=1.0):
    """Factory: scale * sum of pixel values (differentiable)."""

    def fn(images, prompts, metadata=None):
        return scale * images.flatten(1).sum(dim=1), {"device": str(device)}

    fn.differentiable = True
    fn.description = "scaled pixel sum"
    return fn


def pixel_max(images, prompts, metadata=None):
    """Used directly: max pixel value (not marked differentiable)."""
    return images.flatten(1).max(dim=1).values, {}


def make_nan(device="cpu"):
    """Factory whose reward is NaN for samples 0 and 3, inf for none."""

    def fn(images, prompts, metadata=None):
        r = torch.zeros(len(images))
        r[0] = float("nan")
        r[3] = float("nan")
        return r, {}

    return fn


def make_wrong_shape(device="cpu"):
    def fn(images, prompts, metadata=None):
        return torch.zeros(len(images), 2), {}

    return fn


def make_constant(device="cpu", value=1.0):
    """Factory: the same reward for every sample (zero gradient), differentiable."""

    def fn(images, prompts, metadata=None):
        return images.flatten(1).sum(dim=1) * 0.0 + value, {}

    fn.differentiable = True
    return fn


def make_linear(device="cpu", c=1.0):
    """Factory: c · the sum of the sample's coordinates (differentiable; the 1-D Gaussian tilt test)."""

    def fn(images, prompts, metadata=None):
        return c * images.flatten(1).sum(dim=1), {}

    fn.differentiable = True
    return fn
