"""Single-process distillation run: teacher, test set, Distiller, checkpoints and progress.

This is what ``python -m lrra distill --workers 0`` runs; the Ray Train function in
lrra/distributed.py does the same per worker with Ray's reporting in place of the files here.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from lrra import logs
from lrra.config import LRRAConfig
from lrra.config_resume import check_resumable
from lrra.distiller_state import load_checkpoint, save_checkpoint
from lrra.fault_injection import Faults
from lrra.metric_names import BEST_VALIDATION_METRIC, RARE_CLASSES_METRIC, TEST_METRIC, VALIDATION_METRIC
from lrra.teacher import prepare_teacher, save_teacher
from lrra.teacher_files import teacher_label
from lrra.train import Distiller, NonFiniteLossError

# (cfg, teacher meta, teacher path) -> a context holding an experiment-tracking run, e.g.
# lrra.tracking.tracked_distill; it gets on_epoch(metrics, distiller) and log_student(model, meta).
TrackRun = Callable[[LRRAConfig, dict[str, Any], Path], AbstractContextManager[Any]]


class RunDiverged(RuntimeError):
    """A loss went non-finite; the run kept its best student so far. ``result`` is what it achieved."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def format_progress(metrics: dict[str, float], epochs: int) -> str:
    """One human line per epoch."""
    line = f"epoch {int(metrics['epoch']) + 1}/{epochs}"
    if VALIDATION_METRIC in metrics:
        line += (f"  val {metrics[VALIDATION_METRIC]:.4f}  best {metrics[BEST_VALIDATION_METRIC]:.4f}"
                 f"  mean {metrics['val/mean_student_acc']:.4f}")
    if "loss/generator" in metrics:  # absent with gen_steps=0 (a fixed generator)
        line += f"  L_G {metrics['loss/generator']:.3f}"
    line += (f"  L_S {metrics['loss/student_total']:.3f}"
             f"  mem {int(metrics['memory/size'])}  {metrics['perf/student_steps_per_s']:.1f} steps/s")
    if metrics.get(RARE_CLASSES_METRIC):  # a class the student is hardly shown: say it every epoch
        line += f"  rare classes {metrics[RARE_CLASSES_METRIC]:g}"
    if metrics.get(TEST_METRIC) is not None:
        line += f"\n  test accuracy of the best student (epoch {int(metrics['val/best_epoch'])}): " \
                f"{metrics[TEST_METRIC]:.4f}"
    return line


def default_run_name(cfg: LRRAConfig) -> str:
    """<subject>-<date>-<time>-<random>: the default name of a distill run, a Ray Train run and a search.

    The random part keeps two runs started in the same second apart: sharing a name would make
    the second resume the first (a Ray Train run, an Optuna study).
    """
    return f"{cfg.subject}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def diverged_message(error: NonFiniteLossError, distiller: Distiller, kept: str) -> str:
    """One line: what went wrong, and what the run kept."""
    if distiller.best_epoch < 0:
        return f"{error} Nothing to keep: no epoch finished."
    test = distiller.score_on_test()
    return (f"{error} Kept the best student so far (epoch {distiller.best_epoch + 1}, validation accuracy "
            f"{distiller.best_accuracy:.4f}" + (f", test {test:.4f}" if test is not None else "") + f"): {kept}")


# What a student shares with its teacher: the data and the input contract (and the validation rule,
# so that `eval` rebuilds the same test split). The teacher's training record (epochs, seconds) is not the student's.
CONTRACT_KEYS = ("dataset", "num_classes", "channels", "image_size", "mean", "std", "validation")


def student_metadata(distiller: Distiller, teacher_meta: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The best student's own metadata, in the teacher file format: the teacher's data and input
    contract, its architecture, the epochs run and the one chosen, its validation accuracy (what
    chose it) and test accuracy, and which teacher it learnt from."""
    return {**{key: teacher_meta[key] for key in CONTRACT_KEYS if key in teacher_meta},
            "format": "lrra", "arch": distiller.cfg.student_arch, "epochs": distiller.epoch,
            "best_epoch": distiller.best_epoch, "val_accuracy": distiller.best_accuracy,
            "test_accuracy": distiller.score_on_test(), "teacher_arch": teacher_meta.get("arch"),
            "teacher_val_accuracy": teacher_meta.get("val_accuracy"), **extra}


def default_run_dir(cfg: LRRAConfig) -> Path:
    return Path("runs") / "distill" / default_run_name(cfg)


def distill_local(cfg: LRRAConfig, out_dir: str | Path | None = None, resume: str | Path | None = None,
                  track: TrackRun | None = None) -> dict[str, Any]:
    """Distil in this process; write checkpoint.pt, metrics.jsonl and best_student.pt to out_dir.

    With ``track``, the run is also logged there (metrics, images, the best student).

    Everything that can fail on bad input (teacher, dataset, checkpoint) is checked before the
    output folder is created.
    """
    faults = Faults.from_environment()  # the tests' own; none unless LRRA_TEST_FAULTS says
    checkpoint = load_checkpoint(resume) if resume is not None else None
    if checkpoint is not None:  # a checkpoint of another run fails before the teacher is even read
        check_resumable(LRRAConfig.from_dict(checkpoint["config"]), cfg, checkpoint["epoch"])
    teacher, teacher_meta, teacher_path, evaluation = prepare_teacher(cfg)
    distiller = Distiller(cfg, teacher, evaluation, faults=faults, teacher_meta=teacher_meta)
    if checkpoint is not None:
        distiller.load_state_dict(checkpoint)
        logs.core.info(f"resumed from {resume} at epoch {distiller.epoch}")

    out = Path(out_dir) if out_dir is not None else default_run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    logs.core.info(f"distilling {teacher_label(teacher_meta, teacher_path)} -> {cfg.student_arch} on {cfg.dataset}; "
                   f"writing to {out}\n"
                   f"  {evaluation.describe()}")

    def on_epoch(metrics: dict[str, float], d: Distiller) -> None:
        logs.core.info(format_progress(metrics, cfg.epochs))
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        finished = d.epoch == cfg.epochs
        if finished or (cfg.checkpoint_every and d.epoch % cfg.checkpoint_every == 0):
            save_checkpoint(d.state_dict(), out / "checkpoint.pt")
        if run is not None:
            run.on_epoch(metrics, d)

    def keep_best_student() -> str | None:
        """best_student.pt, and the logged model when tracked; returns the model URI."""
        if distiller.best_epoch < 0:
            return None
        student_meta = student_metadata(distiller, teacher_meta, teacher=str(teacher_path))
        model = distiller.best_student_model()
        save_teacher(model, student_meta, out / "best_student.pt")
        return run.log_student(model, student_meta) if run else None

    def result(model_uri: str | None) -> dict[str, Any]:
        tracked = {"mlflow_run_id": run.run_id, "model_uri": model_uri} if run else {}
        return {"preset": cfg.preset, "teacher_acc": teacher_meta["val_accuracy"], **distiller.summary(),
                "wall_s": round(time.perf_counter() - start, 2), "out_dir": str(out), **tracked}

    start = time.perf_counter()
    with track(cfg, teacher_meta, teacher_path) if track else nullcontext() as run:
        try:
            distiller.run(on_epoch)
        except NonFiniteLossError as error:
            # Keep what the run achieved; the error then ends the tracked run as FAILED.
            message = diverged_message(error, distiller, str(out / "best_student.pt"))
            achieved = {**result(keep_best_student()), "diverged": str(error)}
            if run is not None:
                run.tag_failure(message)
            raise RunDiverged(message, achieved) from error
        model_uri = keep_best_student()
    if distiller.rare_classes:
        logs.core.warning(
            f"the generator's last epoch drew classes {distiller.rare_classes} under a quarter of an even share "
            "(as the teacher labels its images), so the student was hardly shown them; `python -m "
            f"bench.synthetic_images {out / 'checkpoint.pt'}` puts its images beside real ones")
    return result(model_uri)
