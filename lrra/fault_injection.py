"""Faults the tests inject on purpose. No user sets them, so they are not configuration.

The process that defines a run reads them from the environment variable ``LRRA_TEST_FAULTS``
(``nan_at_epoch=2``, or ``fault_at_epoch=1,nan_at_epoch=3``) and hands them to the run's workers
with the rest of their config: a Ray worker's environment is the one its Ray started with, not the
driver's of now. No checkpoint, MLflow param or search plan carries them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import torch
from torch import nn

from lrra.config import ConfigError

ENV = "LRRA_TEST_FAULTS"


class InjectedFault(RuntimeError):
    """The failure that ``fault_at_epoch`` asks for."""


@dataclasses.dataclass(frozen=True)
class Faults:
    fault_at_epoch: int = -1  # rank 0 raises InjectedFault as this epoch starts, unless the run resumed (-1: never)
    nan_at_epoch: int = -1    # the teacher's weights turn NaN as this epoch starts, so the loss diverges (-1: never)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Faults:
        text = environ.get(ENV, "").strip()
        names = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, value = part.partition("=")
            if name.strip() not in names or not value.strip().isdigit():
                raise ConfigError(f"{ENV}={text!r}: expected NAME=EPOCH[,NAME=EPOCH] with NAME one of "
                                  f"{sorted(names)} and EPOCH an integer >= 0")
            values[name.strip()] = int(value)
        return cls(**values)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def poison_teacher(self, epoch: int, teacher: nn.Module) -> None:
        """A teacher gone bad mid-run, at the start of ``nan_at_epoch``."""
        if epoch == self.nan_at_epoch:
            with torch.no_grad():
                next(teacher.parameters()).fill_(float("nan"))

    def fails(self, epoch: int, resumed: bool) -> bool:
        """Whether the run fails as ``epoch`` starts: only in a run that did not resume, so the restart
        from the checkpoint before it goes on."""
        return epoch == self.fault_at_epoch and not resumed


NO_FAULTS = Faults()
