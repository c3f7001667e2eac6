"""Command line: ``lrra {teacher,check,distill,search,compare,eval,export,fields,cluster-head} [...]``.

``lrra`` and ``python -m lrra`` are the same command. ``search``, ``compare`` and ``cluster-head``
hand their arguments to tune/search.py, tune/compare.py and tune/head.py, which also run as
scripts (``python tune/search.py`` is the same as ``lrra search``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from lrra import logs
from lrra.cli_args import add_subject_arguments, flag_fields, set_fields
from lrra.config import ConfigError, describe, preset
from lrra.data import DatasetUnavailableError
from lrra.runner import RunDiverged, distill_local
from lrra.teacher import TeacherError, default_teacher_path, prepare_teacher, save_teacher, train_teacher

RAY_STORAGE = "runs/ray"

# Subcommands whose parser and main live in the tune package (imported only when named).
TUNE_COMMANDS = {
    "search": ("tune.search", "search the distillation knobs with Ray Tune and Optuna (python tune/search.py)"),
    "compare": ("tune.compare", "compare variants over seeds on one teacher (python tune/compare.py)"),
    "cluster-head": ("tune.head", "start a cluster head's MLflow server and settings (python tune/head.py)"),
}

# Errors caused by the user's input: print one line, exit 2, no traceback.
USER_ERRORS = (ConfigError, TeacherError, DatasetUnavailableError, FileNotFoundError)
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3  # a loss went non-finite; the best student so far was kept and is in the JSON line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrra", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    set_help = "override any config field, e.g. --set meta_lr=0.5"
    teacher = sub.add_parser("teacher", help="train a teacher on the preset's real training data")
    add_subject_arguments(teacher, preset_default="mnist", set_help=set_help,
                          epochs_help="teacher epochs (default: the preset's)")
    teacher.add_argument("--out", help="output file (default: data/teachers/<dataset>-<arch>-...pt)")

    check = sub.add_parser("check", help="read a teacher and score it on the validation split, nothing else")
    add_subject_arguments(check, preset_default="mnist", set_help=set_help,
                          teacher_help="teacher file (see teacher_format); default: the cached one")

    distill = sub.add_parser("distill", help="data-free distillation of the teacher into the student")
    add_subject_arguments(distill, preset_default="mnist", set_help=set_help,
                          teacher_help="teacher file; default: train and cache one",
                          epochs_help="distillation epochs (default: the preset's)")
    distill.add_argument("--out", help="run folder (default: runs/distill/<preset>-<time>)")
    distill.add_argument("--resume", help="checkpoint.pt of an earlier run to continue")
    ray_train = distill.add_argument_group("Ray Train (with --workers N >= 1)")
    ray_train.add_argument("--workers", type=int, default=0,
                           help="Ray Train workers, each with its own batch (default 0: this process, no Ray)")
    ray_train.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    ray_train.add_argument("--storage", help=f"checkpoints: a folder or an s3:// or gs:// URI (default: {RAY_STORAGE})")
    ray_train.add_argument("--name", help="run name under --storage (default: <preset>-<time>); "
                                          "an existing run of that name is resumed")
    ray_train.add_argument("--max-failures", type=int, default=0,
                           help="worker-group restarts from the latest checkpoint (default: 0)")
    ray_train.add_argument("--address", help="Ray cluster to join (default: start a local Ray)")
    _tracking_uri(distill)

    _tune_command(sub, "search")
    _tune_command(sub, "compare")

    evaluate = sub.add_parser("eval", help="test accuracy of a logged student (an MLflow model URI)")
    add_subject_arguments(evaluate, preset_default="mnist", set_help=set_help)
    evaluate.add_argument("--model", required=True,
                          help="MLflow model URI, e.g. models:/lrra-mnist-student@champion")
    _tracking_uri(evaluate)

    fields = sub.add_parser("fields", help="every config field, its value in the preset and what it does")
    add_subject_arguments(fields, preset_default="mnist", set_help=set_help)

    export = sub.add_parser("export", help="write a student as a torch.export archive, ONNX or TorchScript")
    export.add_argument("student", help="a run folder, a student file (best_student.pt) or an MLflow model URI "
                                        "(models:/lrra-mnist-student@champion)")
    export.add_argument("--format", default="export", choices=["export", "onnx", "torchscript"],
                        help="export: torch.export archive (.pt2, default); onnx (needs lrra[export]); torchscript")
    export.add_argument("--out", help="output file (default: student.pt2/.onnx/.ts beside the student, or here)")
    _tracking_uri(export)
    _tune_command(sub, "cluster-head")
    return parser


def _tune_command(sub, name: str) -> None:
    """Listed in lrra's --help; its arguments go to its own module's parser (see main)."""
    sub.add_parser(name, help=TUNE_COMMANDS[name][1], add_help=False)


def _tracking_uri(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri",
                        help="MLflow store: http://HOST:PORT for a tracking server (default: $MLFLOW_TRACKING_URI, "
                             "else sqlite:///mlflow.db in this folder; 'none' logs nothing)")


def config_from_args(args: argparse.Namespace):
    epochs_field = "teacher_epochs" if args.command == "teacher" else "epochs"
    return preset(args.preset, **set_fields(args), **flag_fields(args, epochs_field))


def checked_tracking_uri(args: argparse.Namespace) -> str | None:
    """The MLflow store of --tracking-uri, checked now, before anything starts; None for 'none'."""
    if args.tracking_uri == "none":
        return None
    from lrra import tracking  # MLflow is imported only when it is used

    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_tracking_uri(uri)
    return uri


def local_tracking_hook(uri: str | None):
    """distill_local's ``track`` argument."""
    if uri is None:
        return None
    from lrra.tracking import tracked_distill

    return functools.partial(tracked_distill, uri)


def run_eval(cfg, args: argparse.Namespace) -> dict:
    from lrra import tracking

    tracking.connect(checked_tracking_uri(args) or tracking.resolve_tracking_uri())
    return tracking.evaluate_logged_student(args.model, cfg)


def run_distill(cfg, args: argparse.Namespace, resume: str | None):
    """In this process (--workers 0) or through Ray Train."""
    ray_flags = {"--gpu": args.gpu, "--storage": args.storage, "--name": args.name,
                 "--max-failures": args.max_failures, "--address": args.address}
    if args.workers == 0:
        if any(ray_flags.values()):
            raise ConfigError(f"{', '.join(k for k, v in ray_flags.items() if v)} only apply with --workers N >= 1")
        return distill_local(cfg, args.out, resume, track=local_tracking_hook(checked_tracking_uri(args)))
    if args.out or resume:
        raise ConfigError("--out and --resume are for --workers 0; under Ray Train the run lives in "
                          "--storage/--name, and running the same --name again resumes it")
    from lrra.distributed import run_distributed  # Ray is imported only when it is used

    return run_distributed(cfg, workers=args.workers, use_gpu=args.gpu, storage_path=args.storage or RAY_STORAGE,
                           name=args.name, max_failures=args.max_failures, address=args.address,
                           tracking_uri=checked_tracking_uri(args))


def run_export(args: argparse.Namespace) -> dict:
    """Load the student, write it, load the file back and compare logits (lrra/export.py)."""
    from lrra.export import FORMATS, TOLERANCE, check_round_trip, export_student, load_student

    if "://" in args.student or args.student.startswith(("models:/", "runs:/")):
        from lrra import tracking

        tracking.connect(checked_tracking_uri(args) or tracking.resolve_tracking_uri())
        folder = Path(".")
    else:
        folder = Path(args.student) if Path(args.student).is_dir() else Path(args.student).parent
    model, meta = load_student(args.student)
    out = Path(args.out) if args.out else folder / f"student{FORMATS[args.format]}"
    export_student(model, meta, args.format, out)
    difference = check_round_trip(model, meta, args.format, out)
    logs.core.info(f"wrote {out} ({args.format}); loaded back, its logits are within {difference:.1e} of the "
                   f"student's (tolerance {TOLERANCE:g}); input: [N, {meta['channels']}, {meta['image_size']}, "
                   f"{meta['image_size']}] normalised with mean {meta.get('mean')} and std {meta.get('std')}")
    return {"student": args.student, "format": args.format, "out": str(out), "max_logit_difference": difference,
            "arch": meta["arch"], "image_size": meta["image_size"], "channels": meta["channels"],
            "mean": meta.get("mean"), "std": meta.get("std")}


def format_fields(cfg) -> str:
    """One line per config field: name, value, docstring (what --set can change)."""
    values = cfg.to_dict()
    width = max(map(len, values))
    return "\n".join(f"{name:<{width}}  {values[name]!r:<14}  {' '.join(doc.split())}"
                     for name, doc in describe().items())


def run_tune_command(name: str, argv: list[str]) -> int:
    import importlib

    module = importlib.import_module(TUNE_COMMANDS[name][0])
    return module.main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TUNE_COMMANDS:
        return run_tune_command(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "export":
            print(json.dumps(run_export(args)))
            return 0
        cfg = config_from_args(args)
        if args.command == "fields":
            print(format_fields(cfg))
            return 0
        resume = getattr(args, "resume", None)
        if resume is not None and not Path(resume).is_file():
            raise FileNotFoundError(f"--resume: checkpoint {resume} does not exist")
        if args.command == "teacher":
            model, meta = train_teacher(cfg)
            path = save_teacher(model, meta, args.out or default_teacher_path(cfg))
            result = {"teacher": str(path), **meta}
        elif args.command == "eval":
            result = run_eval(cfg, args)
        elif args.command == "check":
            _, meta, path, evaluation = prepare_teacher(cfg)
            result = {"teacher": str(path), "teacher_acc": meta["val_accuracy"], "test_accuracy": meta["test_accuracy"],
                      "format": meta["format"], "arch": meta["arch"], "image_size": meta["image_size"],
                      "channels": meta["channels"], "mean": meta["mean"], "std": meta["std"],
                      "validation": evaluation.describe()}
        else:
            result = run_distill(cfg, args, resume)
    except USER_ERRORS as err:
        logs.core.error(f"error: {err}")
        return EXIT_BAD_INPUT
    except RunDiverged as diverged:
        logs.core.error(f"error: {diverged}")
        print(json.dumps(diverged.result))
        return EXIT_DIVERGED
    print(json.dumps(result))
    return 0
