"""The rules every LRRAConfig field must satisfy, checked in a fixed order.

``check_fields`` states each rule as ``need(ok, field, what is allowed)``; ``LRRAConfig.validate``
supplies the ``need`` that raises one ConfigError naming the first field that fails. This module
also parses the per-channel fields (input_mean, input_std) that the rules and the teacher's input
contract (lrra/teacher_files.py) read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING

from lrra.presets import PRESETS

if TYPE_CHECKING:
    from lrra.config import LRRAConfig

# need(ok, field name, what is allowed): raises when ok is False, so each rule may rely on the ones before.
Need = Callable[[bool, str, str], None]

TEACHER_FORMATS = ("auto", "lrra", "export", "torchscript", "state_dict", "pickle")
GENERATOR_OUTPUTS = ("auto", "batchnorm", "pixels")


def per_channel(text: str) -> tuple[float, ...]:
    """'0.485, 0.456,0.406' -> (0.485, 0.456, 0.406); '' -> (). ValueError for anything else."""
    values = tuple(float(part) for part in text.split(",")) if text.strip() else ()
    if not all(math.isfinite(v) for v in values):
        raise ValueError(text)
    return values


def check_fields(cfg: LRRAConfig, need: Need) -> None:
    """Apply every rule to ``cfg`` in order; ``need`` raises on the first that fails."""
    from lrra.external_models import PREFIXES, ExternalArchitectureError, check_external_name
    from lrra.models import ARCHITECTURES  # late import: models imports nothing from here

    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.type in ("int", "float") and isinstance(value, (int, float)) and not isinstance(value, bool):
            need(math.isfinite(value), f.name, "must be a finite number")
    need(cfg.preset in PRESETS, "preset", f"one of {sorted(PRESETS)}")
    need(bool(cfg.dataset), "dataset", "a torchvision class name, 'digits' or 'imagefolder:PATH'")
    for name in ("num_classes", "epochs", "iters_per_epoch", "batch_size", "latent_dim",
                 "generator_width", "kd_steps", "memory_push_every", "memory_push_size",
                 "replay_batches", "teacher_epochs", "teacher_batch_size", "eval_batch_size"):
        need(getattr(cfg, name) >= 1, name, "must be an integer >= 1")
    need(cfg.num_classes >= 2, "num_classes", "must be >= 2")
    need(cfg.image_size >= 8, "image_size", "must be an integer >= 8 (pixels)")
    need(cfg.channels in (1, 3), "channels", "must be 1 or 3")
    for name in ("teacher_arch", "student_arch"):
        arch = getattr(cfg, name)
        if arch.startswith(PREFIXES):
            try:
                check_external_name(arch)
            except ExternalArchitectureError as err:
                need(False, name, str(err))
        else:
            need(arch in ARCHITECTURES, name, f"one of {sorted(ARCHITECTURES)}, torchvision:NAME or timm:NAME")
    need(cfg.teacher_format in TEACHER_FORMATS, "teacher_format", f"one of {list(TEACHER_FORMATS)}")
    for name in ("input_mean", "input_std"):
        try:
            values = per_channel(getattr(cfg, name))
        except ValueError:
            values = None
        need(values is not None, name, "comma-separated numbers, one per channel, e.g. 0.5 or 0.485,0.456,0.406")
        need(values == () or len(values) == cfg.channels, name,
             f"one number per channel: channels={cfg.channels}, got {len(values)}")
    need(all(v > 0 for v in per_channel(cfg.input_std)), "input_std", "every value must be > 0")
    need(bool(cfg.input_mean) == bool(cfg.input_std), "input_std" if cfg.input_mean else "input_mean",
         "input_mean and input_std are set together (or both left empty)")
    need(cfg.gen_steps >= 0, "gen_steps", "must be an integer >= 0")
    for name in ("student_lr", "generator_lr", "teacher_lr"):
        need(getattr(cfg, name) > 0, name, "must be > 0")
    for name in ("student_momentum", "weight_decay", "meta_lr", "w_oh", "w_ie", "w_a", "w_adv", "w_bn",
                 "student_clip_norm", "generator_clip_norm"):
        need(getattr(cfg, name) >= 0, name, "must be >= 0")
    need(cfg.student_momentum < 1, "student_momentum", "must be in [0, 1)")
    need(cfg.generator_output in GENERATOR_OUTPUTS, "generator_output", f"must be one of {GENERATOR_OUTPUTS}")
    need(cfg.generator_warmup_steps >= 0, "generator_warmup_steps", "must be >= 0 (0 = no warm-up)")
    need(cfg.generator_warmup_lr > 0, "generator_warmup_lr", "must be > 0")
    need(0 <= cfg.student_ema < 1, "student_ema", "must be in [0, 1) (0 = no moving average)")
    need(0 <= cfg.synthetic_shift < cfg.image_size // 2, "synthetic_shift",
         f"must be an integer in [0, {cfg.image_size // 2}) pixels (0 = off)")
    need(cfg.retention_order in (0, 1, 2), "retention_order",
         "0 (replay only), 1 (first order) or 2 (second order)")
    need(cfg.memory_capacity >= 0, "memory_capacity", "must be an integer >= 0 (0 = no memory)")
    need(cfg.retention_weight >= 0, "retention_weight", "must be >= 0 (0 = replay only)")
    need(cfg.retention_warmup_epochs >= 0, "retention_warmup_epochs",
         "must be an integer >= 0 (0 = retention from the first epoch)")
    need(cfg.replay_batch_size >= 0, "replay_batch_size",
         "must be an integer >= 0 (0 = replay_batches whole pushes)")
    need(cfg.replay_batch_size == 0 or cfg.replay_batches == 1, "replay_batch_size",
         f"set either replay_batch_size or replay_batches (now {cfg.replay_batches}), not both")
    need(cfg.memory_push_size <= cfg.batch_size, "memory_push_size",
         f"must be <= batch_size ({cfg.batch_size}): a push is a slice of one fresh batch")
    need(cfg.checkpoint_every >= 0, "checkpoint_every", "must be an integer >= 0")
    need(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
         "device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
