"""Time-aligned ("synchronized") multi-agent replay in numpy.

One row is one env step of one cell and holds ALL slices' data for that step, so a sampled batch
gives every critic the joint observation and joint action it needs (MADDPG's replay D of
(x, a_1..a_S, r_1..r_S, x'), Lowe et al. 2017, algorithm 1). Costs are stored raw (1 = SLA
violated); Lagrange multipliers are applied by the learner.

Columns, for ``S`` slices and ``F`` features: ``obs`` and ``next_obs`` ``(S, F)`` float32,
``actions`` (the requested shares the actors sent, after exploration noise), ``rewards`` and
``costs`` ``(S,)`` float32, ``dones`` () float32 (1 on an episode's last interval).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

COLUMNS = ("obs", "actions", "rewards", "costs", "next_obs", "dones")


class SynchronizedReplay:
    """A ring buffer of ``capacity`` joint transitions, sampled uniformly."""

    def __init__(self, capacity: int, num_slices: int, num_features: int, seed: int | None):
        self.capacity = int(capacity)
        shapes = {
            "obs": (num_slices, num_features),
            "actions": (num_slices,),
            "rewards": (num_slices,),
            "costs": (num_slices,),
            "next_obs": (num_slices, num_features),
            "dones": (),
        }
        self.data = {k: np.zeros((self.capacity, *s), dtype=np.float32) for k, s in shapes.items()}
        self.size = 0
        self.next_row = 0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        """Append rows (every column with the same leading length); the oldest are overwritten."""
        n = len(batch["obs"])
        if n > self.capacity:  # only the newest rows fit
            batch = {k: v[-self.capacity :] for k, v in batch.items()}
            n = self.capacity
        rows = (self.next_row + np.arange(n)) % self.capacity
        for k in COLUMNS:
            self.data[k][rows] = batch[k]
        self.next_row = (self.next_row + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, num_batches: int, batch_size: int) -> dict[str, np.ndarray]:
        """``num_batches`` batches of ``batch_size`` rows drawn uniformly with replacement, as
        arrays ``(num_batches, batch_size, ...)``."""
        if self.size == 0:
            raise ValueError("replay: cannot sample from an empty buffer")
        index = self.rng.integers(0, self.size, size=(num_batches, batch_size))
        return {k: v[index] for k, v in self.data.items()}
