"""The student's learning-rate schedule: a cosine from 1 down to 0 over the run's epochs.

Written in closed form (not CosineAnnealingLR's recursion), so that a resumed run whose
``epochs`` grew continues on the cosine of its new length from the epoch it reached
(lrra/distiller_state.py sets the restored optimiser's rate from it).
"""

from __future__ import annotations

import math

import torch


def cosine_factor(epoch: int, epochs: int) -> float:
    """The student's learning-rate multiplier at ``epoch``: cosine from 1 down to 0 over ``epochs``."""
    return 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / epochs))


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``optimizer``'s rates times cosine_factor(epoch, epochs), stepped once per epoch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: cosine_factor(epoch, epochs))
