"""Which real images choose, and which only report: the validation and test splits of a run.

Every choice a run or a search makes (the best epoch, ASHA, Optuna's value, the champion) reads
validation accuracy; the test split scores the chosen student once, at the end. Two rules, by
what the teacher may have seen:

* **Teachers trained here** (``python -m lrra teacher``, or the cache ``distill`` fills) never
  see a fixed holdout of the training split: ``holdout_size(n)`` images (10 %, at most 5,000),
  drawn with the fixed ``SPLIT_SEED``. That holdout is the validation split, and the whole
  official test split reports. The teacher's metadata records the holdout (``validation``).
* **Any other teacher** (a user's own, or one cached before this rule) may have trained on every
  training image. Validation is then a fixed, seeded half of the official test split, and the
  other half reports.

The seed is fixed, not the run's ``seed``: the teacher's holdout and every later run's
validation split must be the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from lrra.config import LRRAConfig
from lrra.data import load_split
from lrra.teacher_files import input_contract

SPLIT_SEED = 0
HOLDOUT_FRACTION = 0.1
HOLDOUT_MAX = 5000
TRAIN_HOLDOUT = "train-holdout"      # validation rule of teachers trained here
TEST_HALF = "test-half"              # validation rule of every other teacher


@dataclass(frozen=True)
class EvaluationSplits:
    validation: Dataset
    test: Dataset
    rule: str  # TRAIN_HOLDOUT or TEST_HALF

    def describe(self) -> str:
        if self.rule == TRAIN_HOLDOUT:
            return (f"validation: {len(self.validation)} training images the teacher never saw; "
                    f"test: the official test split ({len(self.test)})")
        return (f"validation: half of the official test split ({len(self.validation)}), since the teacher "
                f"may have seen every training image; test: the other half ({len(self.test)})")


def holdout_size(train_size: int) -> int:
    return min(HOLDOUT_MAX, max(1, round(HOLDOUT_FRACTION * train_size)))


def _permutation(size: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(SPLIT_SEED))


def subset(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    """The items at ``indices``; a TensorDataset stays one (the fast evaluation path slices it)."""
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(tensor[indices] for tensor in dataset.tensors))
    return Subset(dataset, indices.tolist())


def teacher_training_split(cfg: LRRAConfig, teacher_meta: dict[str, Any] | None = None,
                           ) -> tuple[Dataset, dict[str, Any]]:
    """The training split without its validation holdout, and the ``validation`` metadata to save;
    normalised as ``teacher_meta`` records once the teacher exists (else as the config says)."""
    contract = input_contract(cfg, teacher_meta)
    train = load_split(cfg.dataset, cfg.data_dir, True, cfg.image_size, cfg.channels, *contract)
    order = _permutation(len(train))
    held_out = holdout_size(len(train))
    record = {"rule": TRAIN_HOLDOUT, "train_size": len(train), "holdout": held_out, "seed": SPLIT_SEED}
    return subset(train, order[held_out:].sort().values), record


def evaluation_splits(cfg: LRRAConfig, teacher_meta: dict[str, Any]) -> EvaluationSplits:
    """Validation and test splits for a run distilling the teacher described by ``teacher_meta``,
    brought to its input contract (size, channels, normalisation)."""
    contract = input_contract(cfg, teacher_meta)
    test = load_split(cfg.dataset, cfg.data_dir, False, cfg.image_size, cfg.channels, *contract)
    record = teacher_meta.get("validation") or {}
    if record.get("rule") == TRAIN_HOLDOUT:
        train = load_split(cfg.dataset, cfg.data_dir, True, cfg.image_size, cfg.channels, *contract)
        if len(train) != record["train_size"] or record["seed"] != SPLIT_SEED:
            raise ValueError(f"the teacher held out {record['holdout']} of {record['train_size']} training "
                             f"images (seed {record['seed']}), but {cfg.dataset!r} now has {len(train)}: "
                             "its holdout cannot be rebuilt; train the teacher again")
        held_out = _permutation(len(train))[:record["holdout"]].sort().values
        return EvaluationSplits(subset(train, held_out), test, TRAIN_HOLDOUT)
    order = _permutation(len(test))
    half = len(test) // 2
    return EvaluationSplits(subset(test, order[:half].sort().values), subset(test, order[half:].sort().values),
                            TEST_HALF)
