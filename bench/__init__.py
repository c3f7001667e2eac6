"""Benchmarks and diagnostics (docs/benchmarks.md); what their command lines share."""

import argparse


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts: a bad value is argparse's usage error (exit 2), naming the flag."""
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)
