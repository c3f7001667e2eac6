"""Command line: ``python -m lrra {teacher,distill} --preset NAME [...]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lrra.config import PRESETS, ConfigError, parse_assignments, preset
from lrra.data import DatasetUnavailableError
from lrra.runner import distill_local, stderr_log
from lrra.teacher import TeacherError, default_teacher_path, save_teacher, train_teacher

# Errors caused by the user's input: print one line, exit 2, no traceback.
USER_ERRORS = (ConfigError, TeacherError, DatasetUnavailableError, FileNotFoundError)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="mnist", help=f"one of {sorted(PRESETS)} (default: mnist)")
    parser.add_argument("--data-dir", help="dataset root (default: ./data)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any config field, e.g. --set meta_lr=0.5 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lrra", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    teacher = sub.add_parser("teacher", help="train a teacher on the preset's real training data")
    _common(teacher)
    teacher.add_argument("--epochs", type=int, help="teacher epochs (default: the preset's)")
    teacher.add_argument("--out", help="output file (default: data/teachers/<dataset>-<arch>-...pt)")

    distill = sub.add_parser("distill", help="data-free distillation of the teacher into the student")
    _common(distill)
    distill.add_argument("--teacher", help="teacher file; default: train and cache one")
    distill.add_argument("--epochs", type=int, help="distillation epochs (default: the preset's)")
    distill.add_argument("--out", help="run folder (default: runs/distill/<preset>-<time>)")
    distill.add_argument("--resume", help="checkpoint.pt of an earlier run to continue")
    return parser


def config_from_args(args: argparse.Namespace):
    overrides = parse_assignments(args.overrides)
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.epochs is not None:
        overrides["teacher_epochs" if args.command == "teacher" else "epochs"] = str(args.epochs)
    if getattr(args, "teacher", None):
        overrides["teacher_path"] = args.teacher
    return preset(args.preset, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        resume = getattr(args, "resume", None)
        if resume is not None and not Path(resume).is_file():
            raise FileNotFoundError(f"--resume: checkpoint {resume} does not exist")
        if args.command == "teacher":
            model, meta = train_teacher(cfg, log=stderr_log)
            path = save_teacher(model, meta, args.out or default_teacher_path(cfg))
            result = {"teacher": str(path), **meta}
        else:
            result = distill_local(cfg, args.out, resume)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0
