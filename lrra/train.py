"""One process's LRRA distillation loop (docs/design.md §3).

Each epoch runs ``iters_per_epoch`` iterations of a generator phase and a student phase, then
pushes fresh images into the replay memory, evaluates the student on the real test set and
hands the metrics to ``on_epoch``. Ray, MLflow and Optuna stay outside: the loop takes hooks
(``Collectives`` for the ranks of a distributed run, ``on_epoch``) so the same code runs alone,
under Ray Train and in tests. The Distiller's checkpoint state is in lrra/distiller_state.py,
accuracy scoring in lrra/scoring.py and the learning-rate schedule in lrra/schedule.py.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lrra.batchnorm_prior import BatchNormPrior, generator_ends_in_pixels, generator_warmup_steps
from lrra.config import LRRAConfig
from lrra.distiller_state import CheckpointState
from lrra.fault_injection import NO_FAULTS, Faults
from lrra.losses import generator_loss, generator_loss_terms
from lrra.memory import ReplayMemory
from lrra.meta import GradSync, RankMean, student_update
from lrra.metric_names import BEST_VALIDATION_METRIC, RARE_CLASSES_METRIC, TEST_METRIC, VALIDATION_METRIC
from lrra.models import build_classifier, build_generator
from lrra.phase_clock import PhaseClock
from lrra.schedule import cosine_schedule
from lrra.scoring import accuracy, resolve_device
from lrra.splits import EvaluationSplits
from lrra.teacher_files import input_contract

EpochCallback = Callable[[dict[str, float], "Distiller"], None]


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf; the last checkpoint written before this epoch is intact.

    Raised on every rank of a distributed run alike: the check reads the rank-reduced losses.
    The Distiller still holds the best student of the epochs before (``best_student_model``).
    """


@dataclass(frozen=True)
class Collectives:
    """How the ranks of a distributed run agree; all None (the default) is a single process.

    ``average_gradients`` replaces each gradient by its mean over ranks before an optimizer step;
    ``mean_over_ranks`` is the differentiable mean used inside the LRRA acquisition step;
    ``average_buffers`` averages a module's BatchNorm statistics; ``reduce_metrics`` turns one
    rank's epoch metrics into the run's (every rank gets the same answer).
    """

    average_gradients: GradSync | None = None
    mean_over_ranks: RankMean | None = None
    average_buffers: Callable[[nn.Module], None] | None = None
    reduce_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None


class Distiller(CheckpointState):
    """Student, generator, their optimisers, the replay memory and the RNG streams of one rank.

    Checkpointing (``state_dict``, ``rank_state_dict``, ``load_state_dict``) comes from CheckpointState.
    """

    def __init__(self, cfg: LRRAConfig, teacher: nn.Module, evaluation: EvaluationSplits | None = None, *,
                 device: torch.device | None = None, rank: int = 0,
                 collectives: Collectives = Collectives(), faults: Faults = NO_FAULTS,
                 teacher_meta: dict[str, Any] | None = None) -> None:
        """``evaluation``: the validation split scored every epoch (it picks the best student) and
        the test split that scores that student once, after the last epoch; None on ranks > 0.
        ``teacher_meta``: the teacher file's metadata, whose input normalisation (when it records
        one) a pixel-valued generator output takes (lrra.teacher_files.input_contract).
        ``faults``: the tests' own (lrra/fault_injection.py), none by default."""
        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        self.rank = rank
        self.evaluation = evaluation
        self.collectives = collectives
        self.faults = faults
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

        self.teacher = teacher.to(self.device, memory_format=self.memory_format).eval()
        self.teacher.requires_grad_(False)
        prior = BatchNormPrior(self.teacher) if cfg.w_bn > 0 else None
        self.batchnorm_prior = prior if prior is not None and prior.available else None

        # Same seed on every rank: all workers start from identical weights.
        torch.manual_seed(cfg.seed)
        self.student = build_classifier(cfg.student_arch, cfg.num_classes, cfg.channels)
        self.generator = build_generator(cfg.latent_dim, cfg.image_size, cfg.channels, cfg.generator_width,
                                         self._generator_output(teacher_meta))
        self.student.to(self.device, memory_format=self.memory_format)
        self.generator.to(self.device, memory_format=self.memory_format)

        self.opt_student = torch.optim.SGD(self.student.parameters(), lr=cfg.student_lr,
                                           momentum=cfg.student_momentum, weight_decay=cfg.weight_decay)
        self.sched_student = cosine_schedule(self.opt_student, cfg.epochs)
        # betas (0.5, 0.999): the usual choice for adversarially trained generators.
        self.opt_generator = torch.optim.Adam(self.generator.parameters(), lr=cfg.generator_lr,
                                              betas=(0.5, 0.999))
        self.memory = ReplayMemory(cfg.memory_capacity)
        # The moving average smooths the student over the generator's drift from batch to batch:
        # what it learnt a few hundred steps ago still weighs in the student that is evaluated.
        self.student_average = (AveragedModel(self.student, multi_avg_fn=get_ema_multi_avg_fn(cfg.student_ema),
                                              use_buffers=True) if cfg.student_ema > 0 else None)

        # Per-rank random streams: latents on the device, memory draws on the CPU.
        self.latent_rng = torch.Generator(self.device).manual_seed(cfg.seed + rank)
        self.replay_rng = torch.Generator().manual_seed(cfg.seed + rank)

        self.epoch = 0                      # next epoch to run
        self.accuracies: list[float] = []   # validation accuracy after each finished epoch
        self.best_accuracy = -1.0           # the best of them; its student is best_student
        self.test_accuracy: float | None = None  # the best student's, scored once at the end
        self.best_epoch = -1
        self.best_student: dict[str, torch.Tensor] | None = None
        self.last_metrics: dict[str, float] = {}  # the last finished epoch's (a finished run reports them again)
        # This rank's own losses and speeds of the last epoch, before the ranks' are averaged: what
        # a per-worker view shows (the same as last_metrics' in a single process).
        self.rank_metrics: dict[str, float] = {}
        self.clock = PhaseClock(self.device)
        self._latest_fresh: torch.Tensor | None = None
        self._drawn_classes = torch.zeros(cfg.num_classes, dtype=torch.long, device=self.device)
        self.rare_classes: list[int] = []  # of the last epoch, on this rank

    def _generator_output(self, teacher_meta: dict[str, Any] | None) -> tuple | None:
        """The (mean, std) that turns the generator's pixels into teacher inputs, or None for
        DAFL's affine-free BatchNorm output."""
        if not generator_ends_in_pixels(self.cfg, self.batchnorm_prior is not None):
            return None
        return input_contract(self.cfg, teacher_meta)

    # ------------------------------------------------------------------------------------
    def _autocast(self):
        if not self.cfg.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _synthesise(self, count: int) -> torch.Tensor:
        z = torch.randn(count, self.cfg.latent_dim, device=self.device, generator=self.latent_rng)
        return self.generator(z).contiguous(memory_format=self.memory_format)

    def generator_step(self, adversarial: bool = True) -> dict[str, torch.Tensor]:
        """One update of G; only G's parameters receive gradients. ``adversarial=False`` (the
        warm-up) leaves the student out: the teacher's terms alone."""
        cfg = self.cfg
        with self._autocast():
            images = self._synthesise(cfg.batch_size)
            with self.batchnorm_prior.recording() if self.batchnorm_prior else nullcontext() as prior:
                teacher_logits, teacher_features = self.teacher(images, return_features=True)
            student_logits = self.student(images) if adversarial else None
            terms = generator_loss_terms(teacher_logits, teacher_features, student_logits)
            if adversarial:  # what the epoch's generator draws, as the teacher labels it (no host sync)
                self._drawn_classes += torch.bincount(teacher_logits.detach().argmax(1), minlength=cfg.num_classes)
            if prior:
                terms["bn_statistics"] = torch.stack(prior).sum()
            loss = generator_loss(terms, cfg.w_oh, cfg.w_ie, cfg.w_a, cfg.w_adv, cfg.w_bn)
        params = list(self.generator.parameters())
        # autograd.grad rather than backward: the student's gradients from this phase are discarded.
        for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
            p.grad = g
        if self.collectives.average_gradients is not None:
            self.collectives.average_gradients(params)
        if cfg.generator_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.generator_clip_norm)
        self.opt_generator.step()
        return {"generator": loss.detach(), **{f"gen_{k}": v.detach() for k, v in terms.items()}}

    def student_step(self) -> dict[str, torch.Tensor]:
        """One LRRA student update on a fresh synthetic batch (+ a replayed one when available)."""
        cfg = self.cfg
        with torch.no_grad(), self._autocast():
            x_new = self._synthesise(cfg.batch_size)
            if cfg.synthetic_shift:
                x_new = random_shift(x_new, cfg.synthetic_shift, self.latent_rng).contiguous(
                    memory_format=self.memory_format)
            y_new = self.teacher(x_new).float()
            x_mem = y_mem = None
            if len(self.memory):
                x_mem = self._replay_batch()
                y_mem = self.teacher(x_mem).float()
        self._latest_fresh = x_new
        # Before the warm-up ends the generator's images are poor: replay them, retain nothing (order 0).
        order = cfg.retention_order if self.epoch >= cfg.retention_warmup_epochs else 0
        with self._autocast():
            parts = student_update(self.student, self.opt_student, x_new, y_new, x_mem, y_mem,
                                   meta_lr=cfg.meta_lr, weight_decay=cfg.weight_decay,
                                   retention_order=order, retention_weight=cfg.retention_weight,
                                   sync_grads=self.collectives.average_gradients,
                                   mean_over_ranks=self.collectives.mean_over_ranks,
                                   clip_norm=cfg.student_clip_norm)
        if self.student_average is not None:
            self.student_average.update_parameters(self.student)
        return parts

    @property
    def evaluated_student(self) -> nn.Module:
        """The student that is scored and kept: the moving average when there is one."""
        return self.student_average.module if self.student_average is not None else self.student

    def _replay_batch(self) -> torch.Tensor:
        """x_m: ``replay_batch_size`` stored images, or (0, the paper) ``replay_batches`` whole pushes."""
        if self.cfg.replay_batch_size:
            images = self.memory.sample_images(self.cfg.replay_batch_size, self.replay_rng)
        else:
            images = self.memory.sample(self.cfg.replay_batches, self.replay_rng)
        return images.to(self.device)

    def warm_up_generator(self) -> None:
        """Before the first epoch, ``generator_warmup_steps`` updates of G at ``generator_warmup_lr``
        on the teacher's terms alone, when the BatchNorm prior is on (without it those terms
        collapse G to a few images per class, see docs/results/own-teachers.md). The student then
        starts on images whose statistics are the teacher's data's, not on the generator's first
        noise. Not adversarial, so the faster rate cannot outrun the student."""
        steps = generator_warmup_steps(self.cfg, self.batchnorm_prior is not None)
        if not steps:
            return
        for group in self.opt_generator.param_groups:
            group["lr"] = self.cfg.generator_warmup_lr
        for _ in range(steps):
            self.generator_step(adversarial=False)
        for group in self.opt_generator.param_groups:
            group["lr"] = self.cfg.generator_lr

    # ------------------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        """Run one epoch and return its metrics (eval metrics only where a test set is held)."""
        cfg = self.cfg
        self.student.train()
        self.generator.train()
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def add(parts: dict[str, torch.Tensor], prefix: str) -> None:
            for name, value in parts.items():
                key = prefix + name
                sums[key] = sums.get(key, 0.0) + value.float()
                counts[key] = counts.get(key, 0) + 1

        self._drawn_classes.zero_()  # counted afresh each epoch
        self.faults.poison_teacher(self.epoch, self.teacher)
        if self.epoch == 0:
            self.warm_up_generator()
        learning_rate = self.opt_student.param_groups[0]["lr"]  # the rate this epoch trains with
        start = time.perf_counter()
        for _ in range(cfg.iters_per_epoch):
            for _ in range(cfg.gen_steps):
                with self.clock.phase("perf/generator_step_s"):
                    add(self.generator_step(), "loss/")
            for _ in range(cfg.kd_steps):
                with self.clock.phase("perf/student_step_s"):
                    add(self.student_step(), "loss/student_")
        seconds = time.perf_counter() - start

        # One host sync per epoch: check every loss at once instead of after each step.
        student_steps = cfg.iters_per_epoch * cfg.kd_steps
        metrics = {
            "epoch": self.epoch,
            **{k: float(v / counts[k]) for k, v in sums.items()},
            "perf/epoch_s": seconds,
            "perf/student_steps_per_s": student_steps / seconds,
            "perf/images_per_s": student_steps * cfg.batch_size / seconds,
            **self.clock.mean_seconds(),  # mean seconds of one generator step and of one student (meta) step
        }
        if cfg.gen_steps:
            self.rare_classes = rare_classes(self._drawn_classes.tolist())
            metrics[RARE_CLASSES_METRIC] = float(len(self.rare_classes))
        self.rank_metrics = dict(metrics)
        if self.collectives.reduce_metrics is not None:
            metrics = self.collectives.reduce_metrics(metrics)  # every rank then decides alike below
        bad = {k: v for k, v in metrics.items() if k.startswith("loss/") and not math.isfinite(v)}
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.epoch}: {bad}. Lower student_lr/generator_lr/meta_lr or the "
                "loss weights, or clip gradients.")

        if (self.epoch + 1) % cfg.memory_push_every == 0 and self._latest_fresh is not None:
            self.memory.push(self._latest_fresh[:cfg.memory_push_size])
        self.sched_student.step()
        metrics.update({"memory/size": len(self.memory), "memory/images": self.memory.num_images,
                        "lr/student": learning_rate})
        if self.collectives.average_buffers is not None:
            self.collectives.average_buffers(self.student)
            self.collectives.average_buffers(self.generator)
            if self.student_average is not None:
                self.collectives.average_buffers(self.student_average.module)
        if self.evaluation is not None:
            metrics.update(self._validate())
        self.epoch += 1
        if self.evaluation is not None and self.epoch == cfg.epochs:
            metrics[TEST_METRIC] = self.score_on_test()
        self.last_metrics = metrics
        return metrics

    def _validate(self) -> dict[str, float]:
        student = self.evaluated_student
        acc = accuracy(student, self.evaluation.validation, self.device, self.cfg.eval_batch_size)
        self.accuracies.append(acc)
        if acc > self.best_accuracy:
            self.best_accuracy, self.best_epoch = acc, self.epoch
            self.best_student = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
        return {VALIDATION_METRIC: acc, BEST_VALIDATION_METRIC: self.best_accuracy,
                "val/mean_student_acc": float(np.mean(self.accuracies)),
                # counted from 1, as the epoch metric, MLflow's steps and the progress lines count
                "val/best_epoch": self.best_epoch + 1}

    def score_on_test(self) -> float | None:
        """The best student's test accuracy (once; the test split never picks anything)."""
        if self.test_accuracy is None and self.evaluation is not None and self.best_epoch >= 0:
            self.test_accuracy = accuracy(self.best_student_model().to(self.device), self.evaluation.test,
                                          self.device, self.cfg.eval_batch_size)
        return self.test_accuracy

    def run(self, on_epoch: EpochCallback | None = None) -> dict[str, float]:
        """Train from ``self.epoch`` to ``cfg.epochs``; returns the last epoch's metrics."""
        metrics: dict[str, float] = {}
        while self.epoch < self.cfg.epochs:
            metrics = self.train_epoch()
            if on_epoch is not None:
                on_epoch(metrics, self)
        return metrics

    def summary(self) -> dict[str, Any]:
        """The run's accuracy record so far: validation final, best (and when) and mean over
        epochs, and the test accuracy of the best student once scored."""
        accs = self.accuracies
        return {
            "final_val_acc": accs[-1] if accs else None,
            "best_val_acc": self.best_accuracy,
            "mean_val_acc": float(np.mean(accs)) if accs else None,
            "best_epoch": self.best_epoch,
            "epochs": self.epoch,
            "test_acc": self.test_accuracy,
        }

    def best_student_model(self) -> nn.Module:
        """A copy of the student with the best validation accuracy so far (the current one if none)."""
        model = copy.deepcopy(self.evaluated_student).cpu()
        if self.best_student is not None:
            model.load_state_dict(self.best_student)
        return model.eval()


def random_shift(images: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own offset in [-pixels, pixels] on both axes; edges are repeated."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pixels,) * 4, mode="replicate")
    dy, dx = (torch.randint(0, 2 * pixels + 1, (2, n, 1), device=images.device, generator=generator))
    rows = (dy + torch.arange(h, device=images.device)).unsqueeze(2)   # [n, h, 1]
    cols = (dx + torch.arange(w, device=images.device)).unsqueeze(1)   # [n, 1, w]
    shifted = padded[torch.arange(n, device=images.device).view(n, 1, 1), :, rows, cols]  # [n, h, w, c]
    return shifted.permute(0, 3, 1, 2)


def rare_classes(counts: list[int]) -> list[int]:
    """Classes with under a quarter of an even share of ``counts``: the generator hardly draws them
    (as the teacher labels its images), so the student is hardly shown them."""
    share = sum(counts) / len(counts)
    return [label for label, count in enumerate(counts) if count < share / 4]
