"""The collectives of a Ray Train worker group (torch.distributed only).

The student and the generator are not wrapped in DistributedDataParallel, which can differentiate
neither through ``torch.autograd.grad`` nor twice: each rank computes its gradients locally and
``average_gradients`` all-reduces them, flattened into one buffer, before every optimizer step.
BatchNorm running statistics are averaged at the end of every epoch (``average_float_buffers``).
For retention orders 1 and 2 the acquisition gradient is averaged inside the LRRA step
(``mean_over_ranks``, a collective autograd differentiates through), so N workers take the step of
one process on the union of their batches.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as differentiable
from torch import nn

from lrra.train import Collectives


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average same-dtype tensors across ranks, in place, with a single all_reduce.

    One flat buffer instead of one call per tensor: a ResNet has ~100 parameter tensors and
    each collective has a fixed latency. Every rank must pass the same shapes in the same order.
    """
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for tensor, averaged in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        tensor.copy_(averaged.view_as(tensor))


def mean_over_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mean over ranks of each tensor, as new tensors autograd differentiates through.

    The LRRA step's ``mean_over_ranks``: the backward of this all-reduce all-reduces the incoming
    gradients, so rank r's retention loss reaches every rank's acquisition Hessian, exactly as
    one process would differentiate the mean over the union of the batches. One flat buffer.
    """
    flat = torch.cat([t.reshape(-1) for t in tensors])
    with warnings.catch_warnings():
        # Deprecated in favour of torch.distributed._functional_collectives, a private module whose
        # all_reduce is differentiable only in recent torch releases; this one is, in all we support.
        warnings.simplefilter("ignore", FutureWarning)
        flat = differentiable.all_reduce(flat) / dist.get_world_size()
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


def average_gradients(params: list[nn.Parameter]) -> None:
    """Distiller's ``sync_grads``: replace each gradient by its mean over ranks."""
    for p in params:
        if p.grad is None:
            # Every rank must send the same flat layout; a missing gradient is a zero one.
            p.grad = torch.zeros_like(p)
    all_reduce_mean_([p.grad for p in params])


def average_float_buffers(module: nn.Module) -> None:
    """Distiller's ``sync_buffers``: average BatchNorm running statistics over ranks.

    Integer buffers (num_batches_tracked) advance identically on every rank and are left alone.
    """
    all_reduce_mean_([b for b in module.buffers() if b.is_floating_point()])


def reduce_rank_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Average the per-rank losses and speeds; images/s is summed (the global throughput).

    Other metrics pass through unchanged. Every rank returns the same losses, so every rank
    takes the same decision on a non-finite one.
    """
    per_rank: list[dict[str, Any]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(per_rank, {k: v for k, v in metrics.items() if k.startswith(("loss/", "perf/"))})
    reduced = dict(metrics)
    for key in per_rank[0]:
        values = [m[key] for m in per_rank]
        reduced[key] = sum(values) if key == "perf/images_per_s" else sum(values) / len(values)
    reduced["perf/workers"] = len(per_rank)
    return reduced


RAY_TRAIN_COLLECTIVES = Collectives(average_gradients=average_gradients, mean_over_ranks=mean_over_ranks,
                                    average_buffers=average_float_buffers, reduce_metrics=reduce_rank_metrics)
