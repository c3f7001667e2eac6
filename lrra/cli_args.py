"""The flags that say what to distil, shared by every command that distils: ``python -m lrra``,
``tune/search.py`` and ``tune/compare.py``; and the config fields those flags set."""

from __future__ import annotations

import argparse
import functools
import shutil
import textwrap

from lrra.config import describe, parse_assignments
from lrra.presets import PRESETS

ArgumentTarget = argparse.ArgumentParser | argparse._ArgumentGroup


def add_subject_arguments(target: ArgumentTarget, *, preset_default: str | None, preset_help: str = "",
                          set_help: str, teacher_help: str | None = None, epochs_help: str | None = None) -> None:
    """--preset, --data-dir and --set; --teacher and --epochs where their help is given. A parser
    (not a group) also gets every config field in its --help (``config_fields_help``)."""
    if isinstance(target, argparse.ArgumentParser):
        target.epilog = config_fields_help()
        target.formatter_class = argparse.RawDescriptionHelpFormatter
    target.add_argument("--preset", default=preset_default,
                        help=f"one of {sorted(PRESETS)} ({preset_help or f'default: {preset_default}'})")
    if teacher_help:
        target.add_argument("--teacher", help=teacher_help)
    target.add_argument("--data-dir", help="dataset and teacher cache root (default: ./data)")
    if epochs_help:
        target.add_argument("--epochs", type=int, help=epochs_help)
    target.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"{set_help} (repeatable; every field is listed below)")


@functools.cache  # once per process: every parser that takes --set carries it as its epilog
def config_fields_help() -> str:
    """Every config field with its docstring, for the --help of each command that takes --set."""
    docs = describe()
    name_width = max(map(len, docs))
    text_width = max(40, min(shutil.get_terminal_size().columns, 120) - name_width - 4)
    lines = ["config fields (--set FIELD=VALUE; their values in a preset: lrra fields --preset NAME):"]
    for name, doc in docs.items():
        wrapped = textwrap.wrap(" ".join(doc.split()), text_width, break_on_hyphens=False) or [""]
        lines.append(f"  {name:<{name_width}}  {wrapped[0]}")
        lines.extend(f"  {'':<{name_width}}  {line}" for line in wrapped[1:])
    return "\n".join(lines)


def set_fields(args: argparse.Namespace) -> dict[str, str]:
    """The fields given with --set, as strings (LRRAConfig converts them)."""
    return parse_assignments(args.overrides)


def flag_fields(args: argparse.Namespace, epochs_field: str = "epochs") -> dict[str, str]:
    """The fields that --data-dir, --teacher and --epochs set, for the flags given."""
    fields = {}
    if getattr(args, "data_dir", None):
        fields["data_dir"] = args.data_dir
    if getattr(args, "teacher", None):
        fields["teacher_path"] = args.teacher
    if getattr(args, "epochs", None) is not None:
        fields[epochs_field] = str(args.epochs)
    return fields
