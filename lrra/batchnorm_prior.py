"""DeepInversion's BatchNorm-statistics prior for the generator (Yin et al., CVPR 2020).

A teacher with BatchNorm layers remembers the mean and variance of its training images' features
at every such layer (its running statistics). Synthetic images whose features have the same
statistics look, to the teacher, like its training data; the prior is the distance

    L_bn = sum over BatchNorm layers l of ||mu_l(x) - running_mean_l||_2 + ||sigma2_l(x) - running_var_l||_2

between the batch statistics of the layer's input and the stored ones. Forward hooks on the
teacher's BatchNorm modules read the inputs. A torch.export teacher has no such modules, but
lrra/external_models.py puts a BatchNormInputTap (holding the running statistics) before each
of its batch-norm calls, and those are hooked the same way. A TorchScript teacher, or one
without BatchNorm, has no prior.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from lrra.external_models import BatchNormInputTap
from lrra.library_hooks import batch_norm_base

if TYPE_CHECKING:
    from lrra.config import LRRAConfig


# What comes with the prior (docs/algorithm.md), decided here once for the Distiller and the run's
# first lines: images in pixel values under the teacher's normalisation, and a warm-up of the generator.
def generator_ends_in_pixels(cfg: LRRAConfig, prior_on: bool) -> bool:
    """``generator_output``: pixels, batchnorm, or auto (pixels exactly when the prior is on)."""
    return cfg.generator_output == "pixels" or (cfg.generator_output == "auto" and prior_on)


def generator_warmup_steps(cfg: LRRAConfig, prior_on: bool) -> int:
    """The warm-up steps a run takes: none without the prior, or with a fixed generator (gen_steps=0)."""
    return cfg.generator_warmup_steps if prior_on and cfg.gen_steps else 0


def batchnorm_layers(teacher: nn.Module) -> list[nn.Module]:
    """The teacher's layers whose inputs the prior reads: BatchNorm with running statistics, and the
    taps of an exported graph's batch-norm calls."""
    batch_norm = batch_norm_base()
    return [m for m in teacher.modules()
            if (isinstance(m, batch_norm) and m.track_running_stats) or isinstance(m, BatchNormInputTap)]


class BatchNormPrior:
    def __init__(self, teacher: nn.Module) -> None:
        self.layers = batchnorm_layers(teacher)
        self._terms: list[torch.Tensor] | None = None  # None: not recording
        for layer in self.layers:
            layer.register_forward_hook(self._record)

    @property
    def available(self) -> bool:
        return bool(self.layers)

    def _record(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self._terms is None:
            return  # the student phase's teacher passes need no prior
        x = inputs[0].float()
        dims = [d for d in range(x.dim()) if d != 1]  # every dimension but the channels
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self._terms.append(torch.linalg.vector_norm(mean - layer.running_mean)
                           + torch.linalg.vector_norm(var - layer.running_var))

    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        """Within the block, each teacher forward adds one term per BatchNorm layer to the yielded list."""
        self._terms = terms = []
        try:
            yield terms
        finally:
            self._terms = None
