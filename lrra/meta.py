"""The LRRA student update: knowledge acquisition (meta-train) + knowledge retention (meta-test).

With fresh synthetic images x_n (teacher outputs y_n) and replayed ones x_m (teacher outputs y_m):

    theta' = theta - alpha * (grad l(S_theta(x_n), y_n) + wd * theta)     acquisition: one SGD step
    L      = lambda * l(S_theta'(x_m), y_m)                                retention at theta'
           + l(S_theta(x_n u x_m), y_n u y_m)                              plain KD on both batches
    theta  <- optimizer step with grad_theta L

lambda is ``retention_weight`` (1 in the paper). lambda = 0, like retention_order 0, drops the
retention term (and its acquisition step) altogether: replay only. The training loop passes
order 0 for the first ``retention_warmup_epochs`` epochs.

retention_order chooses how grad_theta of the retention term is taken:
  2: through theta' exactly (second order). It carries -alpha * H_n * grad L_ret, which by a
     first-order Taylor expansion rewards aligning the acquisition and retention gradients.
  1: first order: the gradient of L_ret at theta' applied to theta (no Hessian-vector product).
  0: no retention term; L is the plain KD loss on the concatenated batch (memory replay only).

Under N Ray Train workers (docs/design.md §4) the acquisition gradient is averaged across ranks
(``mean_over_ranks``, a differentiable all-reduce) before theta' is formed, and the final
gradients once more before the step, so N workers take the step one process would take on the
union of their batches.

Two traps this module avoids (docs/design.md §3):
  * theta' is built from the student's real parameters, not a detached copy, so L_ret sends
    gradient to the student (the authors' public code drops it);
  * fast-weight passes run on cloned BatchNorm buffers, so they never move the real student's
    running statistics; only the single plain KD forward does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from lrra.library_hooks import batch_norm_base
from lrra.losses import kd_loss

GradSync = Callable[[list[torch.nn.Parameter]], None]
# Same-shaped tensors in, their mean over all ranks out; autograd differentiates through it.
RankMean = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def _functional_forward(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Forward with the given parameters and *cloned* buffers, leaving the module's own untouched."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return functional_call(model, (params, buffers), (x,))


def _rows_are_independent(model: nn.Module) -> bool:
    """True when each output row depends on its input row alone, as without BatchNorm (which
    normalises with the statistics of the whole batch it is given)."""
    batch_norm = batch_norm_base()
    return not any(isinstance(m, batch_norm) for m in model.modules())


def student_objective(student: nn.Module, x_new: torch.Tensor, y_new: torch.Tensor,
                      x_mem: torch.Tensor | None, y_mem: torch.Tensor | None, *,
                      meta_lr: float, weight_decay: float, retention_order: int,
                      retention_weight: float = 1.0, mean_over_ranks: RankMean | None = None,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss whose gradient w.r.t. the student's parameters is the LRRA update direction.

    Returns (loss, parts) where parts holds detached scalars for logging. Without a memory
    batch it is plain KD on the fresh batch. ``mean_over_ranks`` (distributed runs) averages the
    acquisition gradient over ranks before the fast weights are formed.
    """
    if x_mem is None:
        loss = kd_loss(student(x_new), y_new)
        return loss, {"kd": loss.detach()}

    logits = student(torch.cat([x_new, x_mem]))
    loss_kd = kd_loss(logits, torch.cat([y_new, y_mem]))
    if retention_order == 0 or retention_weight == 0:
        return loss_kd, {"kd": loss_kd.detach()}

    # Knowledge acquisition (meta-train): one differentiable SGD step on the fresh batch. Without
    # BatchNorm, S_theta(x_new) is the plain KD forward's first rows: the same numbers and graph,
    # one forward fewer. With it, the fresh batch is normalised by its own statistics (on cloned
    # buffers), so it needs a forward of its own.
    params = dict(student.named_parameters())
    shared = _rows_are_independent(student)
    logits_new = logits[: len(x_new)] if shared else _functional_forward(student, params, x_new)
    loss_acq = kd_loss(logits_new, y_new)
    # A shared forward's graph is still needed by loss_kd's backward, whatever the order.
    grads = torch.autograd.grad(loss_acq, list(params.values()), create_graph=retention_order == 2,
                                retain_graph=shared or retention_order == 2)
    if mean_over_ranks is not None:
        # Every rank must step to the same theta': the one of the union of all ranks' fresh batches.
        grads = mean_over_ranks(list(grads))
    fast = {name: p - meta_lr * (g + weight_decay * p) for (name, p), g in zip(params.items(), grads, strict=True)}
    # With order 1 the grads are constants, so d theta'/d theta = (1 - alpha*wd) I: first-order MAML.

    # Knowledge retention (meta-test): the memory batch evaluated at the fast weights.
    loss_ret = kd_loss(_functional_forward(student, fast, x_mem), y_mem)
    parts = {"kd": loss_kd.detach(), "acquisition": loss_acq.detach(), "retention": loss_ret.detach()}
    return retention_weight * loss_ret + loss_kd, parts


def student_update(student: nn.Module, optimizer: torch.optim.Optimizer, x_new: torch.Tensor,
                   y_new: torch.Tensor, x_mem: torch.Tensor | None, y_mem: torch.Tensor | None, *,
                   meta_lr: float, weight_decay: float, retention_order: int,
                   retention_weight: float = 1.0, sync_grads: GradSync | None = None,
                   mean_over_ranks: RankMean | None = None, clip_norm: float = 0.0) -> dict[str, torch.Tensor]:
    """One optimizer step of the student on the LRRA objective; returns the logged loss parts.

    ``sync_grads`` runs between backward and step (all-reduce under Ray Train) and
    ``mean_over_ranks`` inside the acquisition step; the student is never wrapped in
    DistributedDataParallel, which cannot differentiate through autograd.grad. ``clip_norm`` > 0
    clips the synced gradient's global norm, identically on every rank.
    """
    loss, parts = student_objective(student, x_new, y_new, x_mem, y_mem, meta_lr=meta_lr,
                                    weight_decay=weight_decay, retention_order=retention_order,
                                    retention_weight=retention_weight, mean_over_ranks=mean_over_ranks)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in student.parameters() if p.requires_grad]
    if sync_grads is not None:
        sync_grads(params)
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    optimizer.step()
    parts["total"] = loss.detach()
    return parts
