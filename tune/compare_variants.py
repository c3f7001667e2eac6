"""What a comparison runs: named variants (config changes on a base config) and the seeds.

A variant is a name and the LRRAConfig fields it changes. They come from three places, in this
order: the built-in ones (``--variants``; all four by default), ``--variant NAME:FIELD=VALUE,...``,
and the top-k configurations of a finished search (``--from-search NAME --top-k K``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from lrra.config import ConfigError, LRRAConfig, parse_assignments
from tune.plan import SearchPlan, filesystem, load_plan
from tune.space import RETENTION_MEMORY
from tune.study import COMPLETED

# Does the meta-learned retention help, against replaying the memory without it, and against no
# memory at all? The memory variants bring their own memory (RETENTION_MEMORY pushes): the
# presets have none by default.
BUILT_IN: dict[str, dict[str, Any]] = {
    "order-2": {"retention_order": 2, "memory_capacity": RETENTION_MEMORY},  # the paper: exact second order
    "order-1": {"retention_order": 1, "memory_capacity": RETENTION_MEMORY},  # first-order retention
    "replay-only": {"retention_order": 0, "memory_capacity": RETENTION_MEMORY},  # replayed as plain KD
    "no-memory": {"memory_capacity": 0},     # plain data-free KD
}
DEFAULT_REFERENCE = "no-memory"


@dataclass(frozen=True)
class Variant:
    name: str
    changes: dict[str, Any]  # LRRAConfig fields, coerced to their types


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: distinct integers >= 0."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text}: expected integers separated by commas, e.g. 0,1,2") from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text}: seeds must be distinct integers >= 0")
    return seeds


def built_in(names: str) -> list[Variant]:
    """--variants order-2,no-memory."""
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BUILT_IN]
    if unknown or not chosen:
        raise ConfigError(f"--variants {names}: unknown variant(s) {unknown}; the built-in ones are {list(BUILT_IN)}")
    return [Variant(name, dict(BUILT_IN[name])) for name in chosen]


def parse_variant(text: str) -> Variant:
    """--variant 'tuned:retention_weight=0.1,retention_warmup_epochs=3'."""
    name, sep, assignments = text.partition(":")
    if not sep or not name.strip() or not assignments.strip():
        raise ConfigError(f"--variant {text}: expected NAME:FIELD=VALUE[,FIELD=VALUE...]")
    return Variant(name.strip(), dict(parse_assignments(assignments.split(","))))


def top_configurations(search_storage: str, search_name: str, top_k: int) -> tuple[SearchPlan, list[Variant]]:
    """The finished search's plan and its ``top_k`` completed trials by best validation accuracy,
    as variants named top1, top2, ... (the searched knobs' values; the rest is the search's base)."""
    if top_k < 1:
        raise ConfigError(f"--top-k {top_k}: must be >= 1")
    try:
        plan = load_plan(search_storage, search_name)
    except ConfigError:
        raise ConfigError(f"--from-search {search_name}: no search of that name under --search-storage "
                          f"{search_storage} (no {search_name}/search.json there)") from None
    fs, path = filesystem(plan.results_path)
    try:
        rows = pq.read_table(path, filesystem=fs).to_pylist()
    except (OSError, FileNotFoundError):
        raise ConfigError(f"--from-search {search_name}: {plan.results_path} is missing; "
                          "has that search finished?") from None
    completed = sorted((r for r in rows if r["stop_reason"] == COMPLETED and r["best_val_acc"] is not None),
                       key=lambda r: r["best_val_acc"], reverse=True)
    if not completed:
        raise ConfigError(f"--from-search {search_name}: no completed trial in {plan.results_path}")
    return plan, [Variant(f"top{rank}", {knob: row[knob] for knob in plan.space})
                  for rank, row in enumerate(completed[:top_k], start=1)]


def trial_points(base: LRRAConfig, variants: list[Variant], seeds: list[int]) -> list[dict[str, Any]]:
    """One Tune config per (variant, seed): the variant's fields and the seed, checked and coerced.

    Every point sets the same fields, those any variant changes (a variant that leaves one alone
    has the base value there): Tune takes preset points only for the keys of its search space.
    Every variant must make a valid config (the error names the variant and the field) and no two
    may be the same configuration: a trial's config is how its result is matched to its variant.
    """
    names = [variant.name for variant in variants]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"variant name(s) {duplicates} given more than once")
    seen: dict[str, str] = {}
    fields = list(dict.fromkeys(field for variant in variants for field in variant.changes))
    points = []
    for variant in variants:
        if "seed" in variant.changes:
            raise ConfigError(f"variant {variant.name}: 'seed' is set per trial by --seeds, not by a variant")
        try:
            cfg = base.replace(**variant.changes)
        except ConfigError as err:
            raise ConfigError(f"variant {variant.name}: {err}") from None
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        if key in seen:
            raise ConfigError(f"variants {seen[key]} and {variant.name} are the same configuration")
        seen[key] = variant.name
        points += [{**{field: getattr(cfg, field) for field in fields}, "seed": seed} for seed in seeds]
    return points
