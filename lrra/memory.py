"""Replay memory: a bounded FIFO of past synthetic batches (LRRA's "retention" data)."""

from __future__ import annotations

from collections import deque

import torch


class ReplayMemory:
    """Holds up to ``capacity`` pushes; each push is one detached batch of images.

    A capacity of 0 disables the memory: pushes are dropped and it is always empty.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"memory capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._batches: deque[torch.Tensor] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def num_images(self) -> int:
        return sum(batch.shape[0] for batch in self._batches)

    def push(self, images: torch.Tensor) -> None:
        """Store a copy of ``images``; the oldest push is evicted once full."""
        if self.capacity:
            self._batches.append(images.detach().clone())

    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` stored pushes drawn uniformly (with replacement), concatenated."""
        if not self._batches:
            raise RuntimeError("cannot sample from an empty replay memory")
        picks = torch.randint(len(self._batches), (count,), generator=generator, device="cpu")
        return torch.cat([self._batches[i] for i in picks.tolist()])

    def sample_images(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` images drawn uniformly (with replacement) from every stored image, whatever its push."""
        if not self._batches:
            raise RuntimeError("cannot sample from an empty replay memory")
        images = torch.cat(list(self._batches))
        picks = torch.randint(len(images), (count,), generator=generator, device="cpu")
        return images[picks.to(images.device)]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "batches": [b.cpu() for b in self._batches]}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"memory state has capacity {state['capacity']}, this memory {self.capacity}")
        self._batches = deque((b.to(device) for b in state["batches"]), maxlen=self.capacity)
