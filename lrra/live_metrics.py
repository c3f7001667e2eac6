"""Live application metrics of a run in flight, through Ray's metrics system (``ray.util.metrics``).

Every Ray Train worker of every trial exports, after each epoch, its student's accuracy, the loss
terms, its own speed, the epoch, its replay-memory fill, the mean time of one generator step and
of one student (meta) step, and the device memory in use where the device is a GPU. A search's
driver adds how many trials run, completed, were stopped or failed, and the best accuracy so far.

Ray's metrics agent on each node serves them on that node's Prometheus endpoint beside Ray's
own node and GPU metrics (no server of ours); Prometheus finds the endpoints through the file
Ray writes, ``/tmp/ray/prom_metrics_service_discovery.json`` (dashboards/prometheus.yml).

Names follow Prometheus conventions; Ray prefixes each with ``ray_`` (``PROMETHEUS_NAME``). Tags:
``search`` (the search's name; ``distill`` for a run outside a search), ``trial`` (the Tune trial
id; the run's name outside a search) and ``rank``. The definitions below are the only list of
what is exported: dashboards/ and its tests read it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from lrra.metric_names import BEST_VALIDATION_METRIC, VALIDATION_METRIC

RAY_PREFIX = "ray_"             # Ray's metrics agent names every application metric ray_<name>
DISTILL_SEARCH = "distill"      # the search tag of a run outside a search
WORKER_TAGS = ("search", "trial", "rank")
SEARCH_TAGS = ("search",)
TRIAL_STATES = ("running", "completed", "stopped", "failed")


@dataclass(frozen=True)
class Spec:
    name: str                   # as defined in Ray, without RAY_PREFIX
    kind: str                   # "gauge" or "counter"
    help: str
    tags: tuple[str, ...] = WORKER_TAGS
    source: str = ""            # the epoch metrics key it is read from, if one

    @property
    def prometheus_name(self) -> str:
        return RAY_PREFIX + self.name


WORKER_SPECS = (
    Spec("lrra_val_accuracy_ratio", "gauge", "validation top-1 accuracy of the student after the last epoch "
         "(rank 0, which evaluates)", source=VALIDATION_METRIC),
    Spec("lrra_best_val_accuracy_ratio", "gauge", "best validation accuracy so far (rank 0)",
         source=BEST_VALIDATION_METRIC),
    Spec("lrra_epochs_completed", "gauge", "epochs this run has finished"),
    Spec("lrra_loss", "gauge", "mean loss of the last epoch on this rank, one series per term (tag term)",
         tags=(*WORKER_TAGS, "term")),
    Spec("lrra_student_steps_per_second", "gauge", "student updates per second on this rank, last epoch",
         source="perf/student_steps_per_s"),
    Spec("lrra_images_per_second", "gauge", "fresh synthetic images per second on this rank, last epoch",
         source="perf/images_per_s"),
    Spec("lrra_generator_step_seconds", "gauge", "mean time of one generator step on this rank, last epoch",
         source="perf/generator_step_s"),
    Spec("lrra_student_step_seconds", "gauge", "mean time of one student (meta) step on this rank, last epoch",
         source="perf/student_step_s"),
    Spec("lrra_memory_fill_ratio", "gauge", "replay memory pushes held / capacity on this rank (0 without one)"),
    Spec("lrra_memory_images", "gauge", "images held in this rank's replay memory", source="memory/images"),
    Spec("lrra_device_memory_allocated_bytes", "gauge", "device memory held by tensors on this rank (GPU only)"),
    Spec("lrra_student_steps_total", "counter", "student updates on this rank since the worker started"),
)
SEARCH_SPECS = (
    Spec("lrra_search_trials", "gauge", "trials of the search by state (tag state: " + ", ".join(TRIAL_STATES) + ")",
         tags=(*SEARCH_TAGS, "state")),
    Spec("lrra_search_best_val_accuracy_ratio", "gauge", "best validation accuracy of any trial so far",
         tags=SEARCH_TAGS),
)
EXPORTED = {spec.prometheus_name: spec for spec in (*WORKER_SPECS, *SEARCH_SPECS)}


def _ray_metric(spec: Spec):
    from ray.util.metrics import Counter, Gauge  # Ray only where metrics are recorded

    cls = Gauge if spec.kind == "gauge" else Counter
    return cls(spec.name, description=spec.help, tag_keys=spec.tags)


class WorkerMetrics:
    """One Ray Train worker's metrics; ``export`` after every epoch."""

    def __init__(self, search: str, trial: str, rank: int) -> None:
        self.tags = {"search": search, "trial": trial, "rank": str(rank)}
        self.metrics = {spec.name: _ray_metric(spec) for spec in WORKER_SPECS}

    def _set(self, name: str, value: float, **extra: str) -> None:
        self.metrics[name].set(float(value), tags={**self.tags, **extra})

    def export(self, metrics: dict[str, Any], rank_metrics: dict[str, Any], memory_capacity: int,
               student_steps: int, device=None) -> None:
        """``metrics``: the epoch's (rank 0 holds the accuracies); ``rank_metrics``: this rank's own
        losses and speeds before the ranks were averaged; ``student_steps``: updates this epoch."""
        for spec in WORKER_SPECS:
            if spec.source:
                value = rank_metrics.get(spec.source, metrics.get(spec.source))
                if value is not None:
                    self._set(spec.name, value)
        self._set("lrra_epochs_completed", int(metrics["epoch"]) + 1)
        for key, value in rank_metrics.items():
            if key.startswith("loss/"):
                self._set("lrra_loss", value, term=key.removeprefix("loss/"))
        size = metrics.get("memory/size", 0)
        self._set("lrra_memory_fill_ratio", size / memory_capacity if memory_capacity > 0 else 0.0)
        if device is not None and device.type == "cuda":
            import torch

            self._set("lrra_device_memory_allocated_bytes", torch.cuda.memory_allocated(device))
        self.metrics["lrra_student_steps_total"].inc(student_steps, tags=self.tags)


class SearchMetrics:
    """A search driver's view: trials by state and the best accuracy so far."""

    def __init__(self, search: str) -> None:
        self.tags = {"search": search}
        self.trials, self.best = (_ray_metric(spec) for spec in SEARCH_SPECS)

    def export(self, states: dict[str, int], best_accuracy: float | None) -> None:
        for state in TRIAL_STATES:
            self.trials.set(float(states.get(state, 0)), tags={**self.tags, "state": state})
        if best_accuracy is not None:
            self.best.set(float(best_accuracy), tags=self.tags)


@functools.cache
def search_metrics(search: str) -> SearchMetrics:
    """One SearchMetrics per search and process (Ray metric objects do not pickle with Tune's state)."""
    return SearchMetrics(search)
