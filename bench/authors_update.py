"""The LRRA student update written the way the authors' public code writes it: a baseline to time.

The structure follows the authors' student step with memory (``distill_knowledge_meta7`` in
github.com/gaurav104/LRA, src/agents/predfkd_meta_memory.py): an inner SGD optimiser over the
student made once, and per step ``higher.innerloop_ctx`` around the student with a
differentiable copy of it; one inner step on the fresh batch, the replayed batch through the
fast model, plain KD through the real student on both batches, one backward, an outer step.

One change, so that it computes the same update as ``lrra.meta`` (and a timing compares like
with like): ``copy_initial_weights=False``. The authors' default (True) starts the fast model from
a *detached* copy of the student, so the retention loss never reaches it (docs/design.md §3,
traps). With False the fast weights are the student's own parameters and the backward carries
the exact second-order term. The inner SGD has momentum 0.9 as theirs, but a fresh differentiable
optimiser has no momentum history, so its one step is theta' = theta - alpha (grad + wd theta),
the same theta' as ``lrra.meta``. ``higher`` copies BatchNorm buffers into the fast model, so the
fast passes leave the student's running statistics alone here too.

Needs the benchmark extra: ``pip install -e .[bench]``.
"""

from __future__ import annotations

import higher
import torch
import torch.nn.functional as F
from torch import nn


class AuthorsUpdate:
    """Order-2 LRRA student update through ``higher``; call with one step's batches."""

    def __init__(self, student: nn.Module, optimizer: torch.optim.Optimizer, *, meta_lr: float,
                 weight_decay: float) -> None:
        self.student, self.optimizer = student, optimizer
        self.inner_optimizer = torch.optim.SGD(student.parameters(), lr=meta_lr, momentum=0.9,
                                               weight_decay=weight_decay)

    def __call__(self, x_new: torch.Tensor, y_new: torch.Tensor, x_mem: torch.Tensor,
                 y_mem: torch.Tensor) -> torch.Tensor:
        self.student.train()
        self.optimizer.zero_grad()
        self.inner_optimizer.zero_grad()
        with higher.innerloop_ctx(self.student, self.inner_optimizer, copy_initial_weights=False) as (fast, diffopt):
            diffopt.step(F.l1_loss(fast(x_new), y_new))           # acquisition: theta -> theta'
            loss_ret = F.l1_loss(fast(x_mem), y_mem)              # retention at theta'
            loss_kd = F.l1_loss(self.student(torch.cat((x_new, x_mem))), torch.cat((y_new, y_mem)))
            total = loss_ret + loss_kd
            total.backward()
        self.optimizer.step()
        return total.detach()
