"""The search space: which LRRA knobs the search tunes, and within which bounds, per preset.

Each preset's ranges sit around its own values (the preset's configuration is always the first
trial, so a range must contain it). A user changes a range with ``--bound NAME=LOW:HIGH`` (or
``NAME=A,B`` for a choice) or a JSON file of the same entries, and fixes a knob with
``--set NAME=VALUE``, which takes it out of the search.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna.distributions as od

from lrra.config import ConfigError, LRRAConfig, coerce


@dataclass(frozen=True)
class Knob:
    """A numeric range (``low``..``high``, inclusive) or a set of ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[int, ...] | None = None

    def distribution(self) -> od.BaseDistribution:
        if self.choices is not None:
            return od.CategoricalDistribution(self.choices)
        if self.integer:
            return od.IntDistribution(int(self.low), int(self.high), log=self.log)
        return od.FloatDistribution(self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.choices is not None:
            return "{" + ", ".join(map(str, self.choices)) + "}"
        scale = "log" if self.log else "integer" if self.integer else "uniform"
        return f"{self.low:g} .. {self.high:g} ({scale})"


def log_range(low: float, high: float) -> Knob:
    return Knob(low, high, log=True)


def int_range(low: int, high: int) -> Knob:
    return Knob(low, high, integer=True)


def choice(*values: int) -> Knob:
    return Knob(choices=values)


Space = dict[str, Knob]

# MNIST-sized grey images on two CPU cores. Ranges around the mnist preset (docs/results/presets.md):
# a student lr around its 0.05 (0.3 diverges); meta_lr well under the ResNet reference's 0.9, which
# diverges on LeNet (no BatchNorm); small step counts, which set both the generator/student ratio and
# an epoch's cost; a generator lr from 1e-4 (best on letters and greek) to 1e-3 (fastest on rotated
# digits); retention weights down to 1/100 and warm-ups up to half the run, since LRRA's retention
# weighted 1:1 cost accuracy at this budget. The student's gradient clipped at norm 2 (the preset), 1
# or not at all: unclipped, the student of a colour teacher dies at chance (photo-patches) and swings
# by 10-20 points from epoch to epoch on letters; at 1 it learns slowly on rotated digits; 2 tied with
# no clipping on digits and greek and won by 15 points on letters (docs/results/presets.md); the
# others stay for teachers nobody measured.
MNIST: Space = {
    "meta_lr": log_range(0.02, 0.2),
    "memory_capacity": int_range(0, 10),
    "gen_steps": int_range(1, 2),
    "kd_steps": int_range(3, 8),
    "retention_order": choice(0, 1, 2),
    "retention_weight": log_range(0.01, 1.0),
    "retention_warmup_epochs": int_range(0, 8),
    "replay_batch_size": choice(0, 32, 64, 128),
    "student_lr": log_range(0.02, 0.15),
    "student_clip_norm": choice(0, 1, 2),
    "generator_lr": log_range(1e-4, 1e-3),
    "w_oh": log_range(0.3, 2.0),
    "w_ie": log_range(2.0, 10.0),
    "w_a": log_range(0.01, 0.3),
    "w_adv": log_range(0.1, 2.0),
}

# The authors' ResNet setup (docs/design.md §3): alpha 0.9, student SGD 0.1, generator Adam 0.02.
REFERENCE: Space = {
    "meta_lr": log_range(0.1, 1.0),
    "memory_capacity": int_range(0, 20),
    "gen_steps": int_range(1, 3),
    "kd_steps": int_range(5, 15),
    "retention_order": choice(0, 1, 2),
    "retention_weight": log_range(0.01, 1.0),
    "retention_warmup_epochs": int_range(0, 100),
    "replay_batch_size": choice(0, 128, 256, 512),
    "student_lr": log_range(0.03, 0.3),
    "generator_lr": log_range(1e-3, 5e-2),
    "w_oh": log_range(0.3, 3.0),
    "w_ie": log_range(1.0, 20.0),
    "w_a": log_range(0.01, 1.0),
    "w_adv": log_range(0.1, 3.0),
}

# Seconds-fast tests: the same knobs, ranges around the digits preset (whose generator learns
# slower than MNIST's: lr 1e-4 beat 3e-4, 1e-3 and 3e-3 there). The warm-up reaches half of its 25 epochs.
# No clipping: a third baseline would fill a three-trial smoke search, and no digits student has died.
DIGITS: Space = {name: knob for name, knob in dict(
    MNIST, memory_capacity=int_range(0, 8), kd_steps=int_range(2, 6), generator_lr=log_range(1e-4, 3e-3),
    retention_warmup_epochs=int_range(0, 12), replay_batch_size=choice(0, 32, 64)).items()
    if name != "student_clip_norm"}

SPACES: dict[str, Space] = {
    "mnist": MNIST, "digits": DIGITS,
    "cifar10": REFERENCE, "cifar100": REFERENCE, "svhn": REFERENCE, "tiny-imagenet": REFERENCE,
}


# ----------------------------------------------------------------------------------------
# User overrides: --bound NAME=SPEC, --space-file FILE, --set NAME=VALUE.


def parse_bounds(items: list[str]) -> dict[str, str]:
    """['meta_lr=0.01:0.5'] -> {'meta_lr': '0.01:0.5'}."""
    bounds = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise ConfigError(f"--bound expects NAME=LOW:HIGH or NAME=A,B,..., got {item!r}")
        bounds[name.strip()] = spec.strip()
    return bounds


def read_space_file(path: str) -> dict[str, Any]:
    """A JSON object of bounds: {"meta_lr": "0.01:0.5", "kd_steps": [2, 8], "retention_order": [0, 2]}."""
    try:
        entries = json.loads(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"--space-file {path}: cannot read it ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--space-file {path}: not valid JSON ({err})") from None
    if not isinstance(entries, dict):
        raise ConfigError(f"--space-file {path}: expected a JSON object of NAME: bounds, got {type(entries).__name__}")
    return entries


def build_space(preset_name: str, bounds: dict[str, Any], fixed: set[str], base: LRRAConfig) -> Space:
    """The preset's space with ``bounds`` applied and the ``fixed`` fields (from --set) left out.

    Every bound is checked twice: as a range (not empty, not inverted, positive on a log scale)
    and as config values (both ends must make a valid LRRAConfig, e.g. retention_order <= 2).
    """
    if preset_name not in SPACES:
        raise ConfigError(f"preset {preset_name!r} has no search space yet: add one to SPACES in tune/space.py")
    space = dict(SPACES[preset_name])
    for name, spec in bounds.items():
        if name not in space:
            raise ConfigError(f"--bound {name}: not a searched knob; the knobs are {sorted(space)}")
        space[name] = _apply_bound(name, space[name], spec)
    for name in fixed:
        space.pop(name, None)
    if not space:
        raise ConfigError("every knob is fixed by --set: nothing left to search")
    for name, knob in space.items():
        for value in (knob.choices if knob.choices is not None else (knob.low, knob.high)):
            base.replace(**{name: value})  # raises ConfigError naming the field and what is allowed
    return space


def _apply_bound(name: str, knob: Knob, spec: Any) -> Knob:
    where = f"--bound {name}={spec}"
    if knob.choices is not None:
        values = spec.split(",") if isinstance(spec, str) else spec if isinstance(spec, list) else None
        if not values:
            raise ConfigError(f"{where}: expected a non-empty list of choices such as 0,2")
        return Knob(choices=tuple(sorted({coerce(name, v) for v in values})))
    if isinstance(spec, str):
        parts = spec.split(":")
    elif isinstance(spec, list):
        parts = spec
    else:
        parts = []
    if len(parts) != 2 or any(str(p).strip() == "" for p in parts):
        raise ConfigError(f"{where}: expected LOW:HIGH (or [LOW, HIGH] in a space file)")
    low, high = (coerce(name, p) for p in parts)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{where}: bounds must be finite numbers")
    if low > high:
        raise ConfigError(f"{where}: inverted bounds (low {low:g} > high {high:g})")
    if low == high:
        raise ConfigError(f"{where}: empty range (low = high = {low:g}); to fix a knob use --set {name}={low:g}")
    if knob.log and low <= 0:
        raise ConfigError(f"{where}: {name} is searched on a log scale, so LOW must be > 0")
    return Knob(low, high, log=knob.log, integer=knob.integer)


def excluded_by_bounds(space: Space, base: LRRAConfig) -> dict[str, Any]:
    """The knobs whose base value lies outside their (bounded) range: knob -> base value."""
    return {name: getattr(base, name) for name in space if not space[name].contains(getattr(base, name))}


def preset_point(space: Space, base: LRRAConfig) -> dict[str, Any] | None:
    """The base configuration's value of every knob, or None when a bound excludes one of them."""
    point = {name: getattr(base, name) for name in space}
    return point if all(space[name].contains(value) for name, value in point.items()) else None


# The replay memory of the memory counterpart of a memory-free preset: 10 pushes, as the mnist
# preset had before its default went to no memory (or the most the space allows).
RETENTION_MEMORY = 10
# ...replayed as plain KD (retention order 0). Measured with seeds 0-2 (README, retention comparison):
# on MNIST replay-only beat no memory on validation (+1.1 points over the run, 97.2 vs 96.8 test)
# while order 2 at weight 1 lost 6.4 points; on digits replay-only tied no memory. A second trial
# with order 2 was stopped by ASHA at its first rung in every default search: a wasted slot.
COUNTERPART_ORDER = 0


# The other baselines of a memory-free preset: its generator this many times faster, then this many
# times slower. The generator's pace decides most of the student's quality and its best value
# depends on the teacher's images (docs/results/presets.md, seed 0, validation): on letters 1e-4
# beat 3e-4 before the student's gradient was clipped (94.0 against 90.2 %), while with the clipped
# preset 9e-4 beat 3e-4 by 5.6 points on rotated digits (91.4 against 85.8 %) and by 2 on a greek
# BatchNorm teacher, and lost 1 on MNIST and 2.7 on letters: so a search runs both and validation
# picks per teacher. The faster comes first: on a slow teacher the third trial is the one the
# default budget cuts, and since clipping the slower generator has not won anywhere measured.
GENERATOR_PACE = 3.0


def baseline_points(space: Space, base: LRRAConfig) -> list[dict[str, Any]]:
    """The first trials of every search: the preset as it is, then its counterparts.

    - A preset with a replay memory is tried without one (plain KD on synthetic images): whether
      the memory helps on this teacher is the first question.
    - A preset without one (the default, since no memory won on every dataset measured) is tried
      with its generator ``GENERATOR_PACE`` times faster and times slower, each when the space holds
      that rate.
    - When the space holds no slower rate (the preset sits at its range's slow end, as digits does),
      it is tried with ``RETENTION_MEMORY`` pushes replayed at ``COUNTERPART_ORDER`` (else at the
      preset's order) instead. The meta-learned orders are left to the sampler.
    """
    point = preset_point(space, base)
    if point is None:
        return []
    slower = generator_counterpart(space, point, 1 / GENERATOR_PACE)
    if point.get("memory_capacity", 0) != 0 or slower is None:
        counterparts = [memory_counterpart(space, point)]
    else:
        counterparts = [generator_counterpart(space, point, GENERATOR_PACE), slower]
    return [point, *(p for p in counterparts if p)]


def generator_counterpart(space: Space, point: dict[str, Any], pace: float) -> dict[str, Any] | None:
    """The point with its generator's learning rate times ``pace``, if the space holds that rate."""
    if "generator_lr" not in space:
        return None
    rate = float(f"{point['generator_lr'] * pace:.3g}")
    return {**point, "generator_lr": rate} if space["generator_lr"].contains(rate) else None


def memory_counterpart(space: Space, point: dict[str, Any]) -> dict[str, Any] | None:
    """The preset with its memory flipped: none if it has one, else RETENTION_MEMORY pushes at COUNTERPART_ORDER."""
    if "memory_capacity" not in space:
        return None
    memory = space["memory_capacity"]
    most = max(memory.choices) if memory.choices is not None else int(memory.high)
    capacity = 0 if point["memory_capacity"] != 0 else min(RETENTION_MEMORY, most)
    if capacity == point["memory_capacity"] or not memory.contains(capacity):
        return None
    flipped = {**point, "memory_capacity": capacity}
    if capacity and "retention_order" in space and space["retention_order"].contains(COUNTERPART_ORDER):
        flipped["retention_order"] = COUNTERPART_ORDER
    return flipped


def parse_point(text: str, space: Space, base: LRRAConfig) -> dict[str, Any]:
    """--point 'student_lr=1e-5,kd_steps=2': a configuration to try early; other knobs keep the base values."""
    point = {name: getattr(base, name) for name in space}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in space:
            raise ConfigError(f"--point {text}: expected KNOB=VALUE[,KNOB=VALUE...] with knobs among {sorted(space)}")
        point[name] = coerce(name, value.strip())
        if not space[name].contains(point[name]):
            raise ConfigError(f"--point {text}: {name}={point[name]} lies outside its range {space[name].describe()}")
    return point


def space_to_json(space: Space) -> dict[str, dict]:
    # Only what is set: a bound of 0 stays (0 == False, hence the identity tests).
    return {name: {k: v for k, v in asdict(knob).items() if v is not None and v is not False}
            for name, knob in space.items()}


def space_from_json(entries: dict[str, dict]) -> Space:
    return {name: Knob(**{k: tuple(v) if k == "choices" else v for k, v in entry.items()})
            for name, entry in entries.items()}


def describe_space(space: Space) -> str:
    width = max(map(len, space))
    return "\n".join(f"  {name:<{width}}  {knob.describe()}" for name, knob in space.items())
