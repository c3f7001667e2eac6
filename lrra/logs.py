"""The lines a command prints while it works, through the standard ``logging`` module.

One logger per layer, all under ``lrra``:

* ``lrra``: the core (teachers, datasets, a single-process run);
* ``lrra.ray_train``: a run on Ray Train workers (lrra/distributed.py);
* ``lrra.search``: the search, its Ray and its cluster (tune/);
* ``lrra.compare``: the comparison of variants (tune/compare.py).

They print bare messages on standard error, as the commands always have, so a user's terminal
and log files look the same as before. Results meant for programs (a run's JSON line, a
search's summary table) stay on standard output with ``print``. To quieten or redirect a layer,
configure its logger as usual, e.g. ``logging.getLogger("lrra.search").setLevel(logging.WARNING)``.
"""

from __future__ import annotations

import logging
import sys

core = logging.getLogger("lrra")
ray_train = logging.getLogger("lrra.ray_train")
search = logging.getLogger("lrra.search")
compare = logging.getLogger("lrra.compare")


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the message, so that output captured
    by replacing it (pytest, a notebook, a redirect set up later) still receives the lines."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass  # always the current sys.stderr


def _install_handler() -> None:
    """Bare messages at INFO on stderr, once per process (also in Ray's worker processes, which
    import this module but run no command's set-up). Not passed on to the root logger, so a
    host application's own handlers do not print every line twice."""
    if any(isinstance(handler, _CurrentStderr) for handler in core.handlers):
        return
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    core.addHandler(handler)
    core.setLevel(logging.INFO)
    core.propagate = False


_install_handler()


def defer_to_process_logging() -> None:
    """In a process whose logging Ray sets up (a Ray Train worker, a Tune trial), hand the lines
    to that set-up instead: its handlers and level decide, as for any other library's logger."""
    for handler in [h for h in core.handlers if isinstance(h, _CurrentStderr)]:
        core.removeHandler(handler)
    core.setLevel(logging.NOTSET)
    core.propagate = True
