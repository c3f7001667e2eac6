"""The Ray Train callback that hands every epoch of a trial's run to Tune, ASHA and Optuna.

It runs in the trial's Ray Train controller, a process of its own that unpickles it at every
trial's start: this module imports only what the callback needs, not the trainer and MLflow
that tune/trial.py brings in (about 2 s of CPU per trial on a busy 2-core machine).
"""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from tune.study import EPOCHS_DONE


class EpochReport(TuneReportCallback):
    """Forwards rank 0's metrics of every epoch to Tune, with the 1-based ``epochs_done``.

    ASHA and Optuna count progress in epochs, not in Tune iterations: a resumed trial restarts
    Tune's iteration count at 1 while its Ray Train run continues from its checkpoint's epoch.
    """

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        rank0 = {**metrics[0], EPOCHS_DONE: int(metrics[0]["epoch"]) + 1}
        super().after_report(run_context, [rank0, *metrics[1:]], checkpoint)
