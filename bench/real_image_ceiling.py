"""What the student could reach with real images in hand: is it the images, the loss or the student?

A data-free run learns from synthetic images only. When its student lags its teacher, this
diagnostic tells the causes apart by training the run's own student, with the run's optimiser
(SGD, ``student_lr``, momentum, weight decay, ``student_clip_norm``) and as many student steps as
the run makes (``epochs x iters_per_epoch x kd_steps``), on *real* training images instead:

* ``l1``:     distilled with the run's loss (L1 between logits): what perfect images would give;
* ``kl``:     distilled with KL between the softmaxes (Hinton's KD at temperature 1);
* ``labels``: trained on the true labels (no teacher): what the student's size allows.

    python -m bench.real_image_ceiling --teacher data/teachers/photo-patches-lenet5-32px-seed0.pt \\
        --set dataset=photo-patches --set channels=3

The training images are the split the teacher trained on (its validation holdout left out);
validation chooses the reported step, test reports. It runs on the CPU. It reads training images,
which a data-free run never does: it is for diagnosis, never for choosing a recipe's defaults.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from bench import positive_int
from lrra.cli_args import add_subject_arguments, flag_fields, set_fields
from lrra.config import preset
from lrra.data import load_split
from lrra.losses import kd_loss
from lrra.models import build_classifier
from lrra.scoring import accuracy
from lrra.splits import TRAIN_HOLDOUT, teacher_training_split
from lrra.teacher import prepare_teacher
from lrra.teacher_files import input_contract

LOSSES = ("l1", "kl", "labels")


def loss_of(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            labels: torch.Tensor) -> torch.Tensor:
    if kind == "labels":
        return F.cross_entropy(student_logits, labels)
    if kind == "kl":
        return F.kl_div(F.log_softmax(student_logits, 1), F.log_softmax(teacher_logits, 1),
                        reduction="batchmean", log_target=True)
    return kd_loss(student_logits, teacher_logits)


def train_on_real_images(cfg, teacher, images, labels, evaluation, kind: str, steps: int,
                         evaluate_every: int) -> dict[str, float]:
    """The run's student trained ``steps`` steps on real images; its best validation accuracy and
    the test accuracy at that step."""
    torch.manual_seed(cfg.seed)
    student = build_classifier(cfg.student_arch, cfg.num_classes, cfg.channels)
    optimiser = torch.optim.SGD(student.parameters(), lr=cfg.student_lr, momentum=cfg.student_momentum,
                                weight_decay=cfg.weight_decay)
    best = {"val_acc": -1.0, "test_acc": 0.0, "step": 0}
    for step in range(1, steps + 1):
        batch = torch.randint(0, len(images), (cfg.batch_size,))
        x, y = images[batch], labels[batch]
        with torch.no_grad():
            target = teacher(x) if kind != "labels" else None
        loss = loss_of(kind, student(x), target, y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.student_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.student_clip_norm)
        optimiser.step()
        if step % evaluate_every == 0 or step == steps:
            val = accuracy(student, evaluation.validation, torch.device("cpu"), cfg.eval_batch_size)
            if val > best["val_acc"]:
                test = accuracy(student, evaluation.test, torch.device("cpu"), cfg.eval_batch_size)
                best = {"val_acc": val, "test_acc": test, "step": step}
            print(f"  {kind:<6} step {step:>5}/{steps}  val {val:.4f}  best {best['val_acc']:.4f}", flush=True)
    return best


def training_images(cfg, teacher_meta) -> tuple[torch.Tensor, torch.Tensor]:
    """The real training images under the teacher's contract, less the holdout a teacher trained
    here never saw (it is this run's validation split)."""
    if (teacher_meta.get("validation") or {}).get("rule") == TRAIN_HOLDOUT:
        training, _ = teacher_training_split(cfg, teacher_meta)
    else:  # a teacher from elsewhere: validation and test are halves of the test split
        training = load_split(cfg.dataset, cfg.data_dir, True, cfg.image_size, cfg.channels,
                              *input_contract(cfg, teacher_meta))
    if not isinstance(training, TensorDataset):
        raise SystemExit(f"dataset {cfg.dataset!r} is read lazily from files; this diagnostic takes the "
                         "in-memory datasets (torchvision's, digits, the glyph, photo and robustness sets)")
    return training.tensors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.real_image_ceiling", description=__doc__.split("\n")[0])
    add_subject_arguments(parser, preset_default="mnist", set_help="a config field of the run to mirror",
                          teacher_help="the teacher file (default: the preset's cached one)",
                          epochs_help="the run's epochs (default: the preset's)")
    parser.add_argument("--losses", default=",".join(LOSSES), help=f"which of {LOSSES} (comma-separated)")
    parser.add_argument("--steps", type=positive_int, help="student steps (default: as many as the run makes)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    kinds = args.losses.split(",")
    if unknown := [k for k in kinds if k not in LOSSES]:
        parser.error(f"--losses: {unknown} not in {LOSSES}")
    try:  # a bad field, teacher file or dataset: the usage error (exit 2), before any training
        cfg = preset(args.preset, **set_fields(args), **flag_fields(args))
        teacher, meta, path, evaluation = prepare_teacher(cfg)
    except ValueError as err:
        parser.error(str(err))
    teacher.eval()
    images, labels = training_images(cfg, meta)
    steps = args.steps or cfg.epochs * cfg.iters_per_epoch * cfg.kd_steps
    print(f"teacher {path}: validation {meta['val_accuracy']:.4f}, test {meta['test_accuracy']:.4f}; "
          f"student {cfg.student_arch}, {steps} steps on {len(images)} real training images")
    results = {"teacher": {"val_acc": meta["val_accuracy"], "test_acc": meta["test_accuracy"]}, "steps": steps}
    for kind in kinds:
        started = time.perf_counter()
        results[kind] = train_on_real_images(cfg, teacher, images, labels, evaluation, kind, steps,
                                             evaluate_every=max(1, steps // 10))
        results[kind]["seconds"] = round(time.perf_counter() - started, 1)
    print(f"{'trained with':<14}{'validation':>12}{'test':>8}  (teacher {meta['test_accuracy']:.4f} test)")
    for kind in kinds:
        print(f"{kind:<14}{results[kind]['val_acc']:>12.4f}{results[kind]['test_acc']:>8.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
