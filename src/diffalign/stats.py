"""Per-prompt reward normalisation (DDPO's stat tracker)."""

from __future__ import annotations

from collections import defaultdict, deque

import numpy as np


class PerPromptStatTracker:
    """Advantages (r - mean) / std with statistics from a buffer of each prompt's recent
    rewards; a prompt seen fewer than `min_count` times uses the whole batch's stats."""

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque] = defaultdict(lambda: deque(maxlen=buffer_size))

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts but {len(rewards)} rewards")
        advantages = np.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std() + 1e-6
        for prompt in dict.fromkeys(prompts):  # unique, in first-seen order (deterministic)
            idx = np.array([i for i, p in enumerate(prompts) if p == prompt])
            buf = self.buffers[prompt]
            buf.extend(rewards[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buf), np.std(buf) + 1e-6
            advantages[idx] = (rewards[idx] - mean) / std
        return advantages

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers = defaultdict(lambda: deque(maxlen=self.buffer_size))
        for p, values in state["buffers"].items():
            self.buffers[p].extend(values)
