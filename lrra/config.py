"""One flat configuration for an LRRA distillation run, and its named presets.

The same object feeds the CLI (``--set field=value``), the Tune search space, MLflow params
and the checkpoint. Every field has a one-line docstring (the string under it); ``describe()``
reads them back for ``--help``-style listings.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import math
import os
import re
from dataclasses import dataclass, fields
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and what is allowed."""


@dataclass
class LRRAConfig:
    # --- what is distilled -------------------------------------------------------------
    preset: str = "mnist"
    """Name of the preset these values started from (informational once built)."""
    dataset: str = "MNIST"
    """Real labelled data: a torchvision class name (MNIST, CIFAR10, ...), 'digits', or 'imagefolder:PATH'."""
    data_dir: str = "data"
    """Root folder where datasets are looked for and downloaded to."""
    num_classes: int = 10
    """Number of classes of the teacher and the student."""
    image_size: int = 32
    """Side of the square images the teacher takes and the generator makes (at least 8)."""
    channels: int = 1
    """Image channels (1 for grey, 3 for colour)."""
    teacher_arch: str = "lenet5"
    """Teacher network: a name in lrra.models.ARCHITECTURES, torchvision:NAME or timm:NAME (for a state_dict)."""
    student_arch: str = "lenet5_half"
    """Student network: a name in lrra.models.ARCHITECTURES, torchvision:NAME or timm:NAME."""
    teacher_path: str = ""
    """Teacher file (see teacher_format); empty means train (and cache) one under data_dir."""
    teacher_format: str = "auto"
    """How to read teacher_path: auto (from the file), lrra, export (torch.export), torchscript, state_dict,
    or pickle (a whole pickled nn.Module: runs code from the file, so only for files you trust)."""
    input_mean: str = ""
    """The teacher's input normalisation, per channel, e.g. 0.485,0.456,0.406; empty: the teacher file's,
    else the dataset's."""
    input_std: str = ""
    """Per-channel standard deviation of that normalisation (as input_mean)."""

    # --- distillation budget -----------------------------------------------------------
    epochs: int = 20
    """Epochs of distillation; the student is evaluated on the real test set after each."""
    iters_per_epoch: int = 50
    """Iterations (one generator phase + one student phase) per epoch."""
    batch_size: int = 256
    """Synthetic images per generator call, per worker."""
    latent_dim: int = 100
    """Size of the generator's Gaussian input z."""
    generator_width: int = 128
    """Channels of the generator's first feature map (128 in the reference generator)."""
    gen_steps: int = 1
    """Generator updates per iteration."""
    kd_steps: int = 5
    """Student updates per iteration."""

    # --- optimisers --------------------------------------------------------------------
    student_lr: float = 0.1
    """Student SGD learning rate (cosine-annealed over epochs)."""
    student_momentum: float = 0.9
    """Student SGD momentum."""
    weight_decay: float = 5e-4
    """Student weight decay, also used inside the meta (fast-weight) SGD step."""
    generator_lr: float = 1e-3
    """Generator Adam learning rate."""
    meta_lr: float = 0.9
    """alpha: step size of the fast-weight SGD step in knowledge acquisition (meta-train)."""
    retention_order: int = 2
    """Meta-gradient of the retention loss: 2 second order (paper), 1 first order, 0 replay only."""
    retention_weight: float = 1.0
    """lambda: weight of the retention term l(S_theta'(x_m), T(x_m)) vs. the KD term (1: paper; 0: replay only)."""
    retention_warmup_epochs: int = 0
    """Epochs before the retention term switches on (replay-only KD on x_n u x_m until then); 0 = from the start."""
    student_clip_norm: float = 0.0
    """Clip the student's (rank-averaged) gradient to this global L2 norm before each step; 0 = off."""
    generator_clip_norm: float = 0.0
    """Clip the generator's (rank-averaged) gradient to this global L2 norm before each step; 0 = off."""
    student_ema: float = 0.0
    """Decay of an exponential moving average of the student's weights, updated after every student
    step; the average is the student that is evaluated and kept. 0 = off (the student itself)."""
    synthetic_shift: int = 0
    """Shift each synthetic image of the student phase by up to this many pixels (replicate padding)
    before the teacher labels it: more views of what the generator makes. 0 = off."""

    # --- replay memory -----------------------------------------------------------------
    memory_capacity: int = 10
    """Pushes the FIFO memory holds per worker (0 disables memory and retention)."""
    memory_push_every: int = 5
    """Epochs between two pushes of fresh synthetic images into the memory."""
    memory_push_size: int = 32
    """Images per push, sliced from the latest fresh batch (B/8 in the reference)."""
    replay_batches: int = 1
    """Stored pushes replayed together at each student step."""
    replay_batch_size: int = 0
    """Images replayed per student step, drawn uniformly from all stored images; 0 = replay_batches whole pushes."""

    # --- generator loss weights --------------------------------------------------------
    w_oh: float = 1.0
    """Weight of the one-hot (teacher confidence) loss."""
    w_ie: float = 5.0
    """Weight of the information-entropy (class balance) loss."""
    w_a: float = 0.1
    """Weight of the activation loss (-mean |teacher features|)."""
    w_adv: float = 1.0
    """Weight of the adversarial teacher-student disagreement the generator maximises."""
    w_bn: float = 1.0
    """Weight of DeepInversion's BatchNorm-statistics prior (teachers with BatchNorm only; others
    ignore it); 0 = off."""

    # --- teacher training (when no teacher_path is given) ------------------------------
    teacher_epochs: int = 10
    """Epochs of supervised teacher training on the real training split."""
    teacher_lr: float = 1e-3
    """Teacher learning rate (Adam for LeNets, SGD+cosine for ResNets)."""
    teacher_batch_size: int = 128
    """Batch size of teacher training."""

    # --- run mechanics -----------------------------------------------------------------
    seed: int = 0
    """Base random seed; each worker uses seed + rank for its latent stream."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."""
    eval_batch_size: int = 1024
    """Batch size of test-set evaluation."""
    checkpoint_every: int = 1
    """Epochs between checkpoints (0: only at the end)."""
    bf16: bool = False
    """Run forward passes under bfloat16 autocast (GPU option)."""
    channels_last: bool = True
    """Keep images, activations and conv weights in the channels-last memory format. On by default:
    on the CPU, PyTorch's convolutions and nearest-neighbour upsampling (the generator's) run much
    faster in it (an MNIST-preset iteration in 0.53-0.68x the time); on GPUs it is unmeasured here."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; raise one ConfigError naming the first bad field."""
        from lrra.external_models import PREFIXES, ExternalArchitectureError, check_external_name
        from lrra.models import ARCHITECTURES  # late import: models imports nothing from here

        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"config field '{name}' = {getattr(self, name)!r} is invalid: {allowed}")

        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and isinstance(value, (int, float)) and not isinstance(value, bool):
                need(math.isfinite(value), f.name, "must be a finite number")
        need(self.preset in PRESETS, "preset", f"one of {sorted(PRESETS)}")
        need(bool(self.dataset), "dataset", "a torchvision class name, 'digits' or 'imagefolder:PATH'")
        for name in ("num_classes", "epochs", "iters_per_epoch", "batch_size", "latent_dim",
                     "generator_width", "kd_steps", "memory_push_every", "memory_push_size",
                     "replay_batches", "teacher_epochs", "teacher_batch_size", "eval_batch_size"):
            need(getattr(self, name) >= 1, name, "must be an integer >= 1")
        need(self.num_classes >= 2, "num_classes", "must be >= 2")
        need(self.image_size >= 8, "image_size", "must be an integer >= 8 (pixels)")
        need(self.channels in (1, 3), "channels", "must be 1 or 3")
        for name in ("teacher_arch", "student_arch"):
            arch = getattr(self, name)
            if arch.startswith(PREFIXES):
                try:
                    check_external_name(arch)
                except ExternalArchitectureError as err:
                    need(False, name, str(err))
            else:
                need(arch in ARCHITECTURES, name, f"one of {sorted(ARCHITECTURES)}, torchvision:NAME or timm:NAME")
        need(self.teacher_format in TEACHER_FORMATS, "teacher_format", f"one of {list(TEACHER_FORMATS)}")
        for name in ("input_mean", "input_std"):
            try:
                values = per_channel(getattr(self, name))
            except ValueError:
                values = None
            need(values is not None, name, "comma-separated numbers, one per channel, e.g. 0.5 or 0.485,0.456,0.406")
            need(values == () or len(values) == self.channels, name,
                 f"one number per channel: channels={self.channels}, got {len(values)}")
        need(all(v > 0 for v in per_channel(self.input_std)), "input_std", "every value must be > 0")
        need(bool(self.input_mean) == bool(self.input_std), "input_std" if self.input_mean else "input_mean",
             "input_mean and input_std are set together (or both left empty)")
        need(self.gen_steps >= 0, "gen_steps", "must be an integer >= 0")
        for name in ("student_lr", "generator_lr", "teacher_lr"):
            need(getattr(self, name) > 0, name, "must be > 0")
        for name in ("student_momentum", "weight_decay", "meta_lr", "w_oh", "w_ie", "w_a", "w_adv", "w_bn",
                     "student_clip_norm", "generator_clip_norm"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.student_momentum < 1, "student_momentum", "must be in [0, 1)")
        need(0 <= self.student_ema < 1, "student_ema", "must be in [0, 1) (0 = no moving average)")
        need(0 <= self.synthetic_shift < self.image_size // 2, "synthetic_shift",
             f"must be an integer in [0, {self.image_size // 2}) pixels (0 = off)")
        need(self.retention_order in (0, 1, 2), "retention_order",
             "0 (replay only), 1 (first order) or 2 (second order)")
        need(self.memory_capacity >= 0, "memory_capacity", "must be an integer >= 0 (0 = no memory)")
        need(self.retention_weight >= 0, "retention_weight", "must be >= 0 (0 = replay only)")
        need(self.retention_warmup_epochs >= 0, "retention_warmup_epochs",
             "must be an integer >= 0 (0 = retention from the first epoch)")
        need(self.replay_batch_size >= 0, "replay_batch_size",
             "must be an integer >= 0 (0 = replay_batches whole pushes)")
        need(self.replay_batch_size == 0 or self.replay_batches == 1, "replay_batch_size",
             f"set either replay_batch_size or replay_batches (now {self.replay_batches}), not both")
        need(self.memory_push_size <= self.batch_size, "memory_push_size",
             f"must be <= batch_size ({self.batch_size}): a push is a slice of one fresh batch")
        need(self.checkpoint_every >= 0, "checkpoint_every", "must be an integer >= 0")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
             "device", "'auto', 'cpu', 'cuda' or 'cuda:N'")

    # ------------------------------------------------------------------------------------
    @property
    def subject(self) -> str:
        """What is distilled, as a name for runs, searches and registered models.

        The preset's name when the config uses the preset's own dataset, else a slug of the
        dataset: the mnist preset with dataset=FashionMNIST is 'fashionmnist', and an
        'imagefolder:PATH' dataset is named after its folder.
        """
        if self.dataset == PRESETS[self.preset].get("dataset"):
            return self.preset
        name = self.dataset.removeprefix("imagefolder:").rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "dataset"

    def with_absolute_paths(self) -> LRRAConfig:
        """data_dir and teacher_path made absolute, against this process's working folder.

        Done once, where the user's command runs: Ray workers and trials run in working folders
        of their own (which differ between Ray sessions, so they must never enter a run's config).
        """
        teacher = os.path.abspath(self.teacher_path) if self.teacher_path else ""
        return dataclasses.replace(self, data_dir=os.path.abspath(self.data_dir), teacher_path=teacher)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> LRRAConfig:
        """A validated copy with some fields changed (unknown fields are an error)."""
        check_field_names(changes)
        return dataclasses.replace(self, **{k: coerce(k, v) for k, v in changes.items()})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LRRAConfig:
        """Rebuild from to_dict() output (a checkpoint, MLflow params, a Tune config)."""
        values = {k: v for k, v in values.items() if k not in RETIRED_FIELDS}
        check_field_names(values)
        return cls(**{k: coerce(k, v) for k, v in values.items()})


TEACHER_FORMATS = ("auto", "lrra", "export", "torchscript", "state_dict", "pickle")


def per_channel(text: str) -> tuple[float, ...]:
    """'0.485, 0.456,0.406' -> (0.485, 0.456, 0.406); '' -> (). ValueError for anything else."""
    values = tuple(float(part) for part in text.split(",")) if text.strip() else ()
    if not all(math.isfinite(v) for v in values):
        raise ValueError(text)
    return values


FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(LRRAConfig)}


def check_field_names(values: dict[str, Any]) -> None:
    unknown = sorted(set(values) - set(FIELD_TYPES))
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(FIELD_TYPES)}")


def coerce(name: str, value: Any) -> Any:
    """Turn a CLI string (or a numpy scalar from a search space) into the field's type."""
    kind = FIELD_TYPES[name]
    original = value
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind == "int":
            if isinstance(value, str):
                value = ast.literal_eval(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (ValueError, SyntaxError, TypeError):
        raise ConfigError(f"config field '{name}' = {original!r} is invalid: must be of type {kind}") from None


def describe() -> dict[str, str]:
    """Field name -> its one-line docstring, read from this module's source."""
    source = inspect.getsource(LRRAConfig)
    tree = ast.parse(source)
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, following in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            docs[node.target.id] = following.value.value  # type: ignore[union-attr]
    return docs


# ----------------------------------------------------------------------------------------
# Presets. Each is a set of overrides on the dataclass defaults.
#
# mnist is the embedded default (LeNet-5 -> LeNet-5-half, the classic pair of DAFL and its
# successors), sized to finish in minutes on a laptop CPU. cifar100 is the authors' reference
# configuration (docs/design.md §3); cifar10, svhn and tiny-imagenet reuse it with their data.
_REFERENCE = dict(
    teacher_arch="resnet34", student_arch="resnet18", channels=3, image_size=32,
    batch_size=512, latent_dim=1000, generator_width=128, gen_steps=1, kd_steps=10,
    iters_per_epoch=72, epochs=400, student_lr=0.1, student_momentum=0.9, weight_decay=5e-4,
    generator_lr=0.02, meta_lr=0.9, retention_order=2, memory_capacity=10, memory_push_every=5,
    memory_push_size=64, replay_batches=1, w_oh=1.0, w_ie=5.0, w_a=0.1, w_adv=1.0,
    teacher_epochs=200, teacher_lr=0.1, teacher_batch_size=128,
    w_bn=0.0,  # the authors' generator has no BatchNorm prior
)

PRESETS: dict[str, dict[str, Any]] = {
    "mnist": dict(
        dataset="MNIST", num_classes=10, image_size=32, channels=1,
        teacher_arch="lenet5", student_arch="lenet5_half",
        # Sized for two CPU cores (~7 min a run on one thread). Chosen on validation across MNIST, its
        # robustness variants and the glyph datasets (docs/results/presets.md): alpha 0.1, since LeNet
        # has no BatchNorm to absorb the reference's 0.9; no memory, which beat LRRA's at this budget;
        # a generator at 3e-4, since at 1e-3 it outran the student on letters (-17 points) and greek
        # (-2), and at 1e-4 it was too slow for rotated digits (-10).
        batch_size=128, latent_dim=100, generator_width=32, gen_steps=1, kd_steps=5,
        iters_per_epoch=20, epochs=30, student_lr=0.05, generator_lr=3e-4, meta_lr=0.1,
        memory_capacity=0, memory_push_every=1, memory_push_size=16,
        teacher_epochs=10, teacher_lr=1e-3, teacher_batch_size=128,
    ),
    "cifar10": dict(_REFERENCE, dataset="CIFAR10", num_classes=10),
    "cifar100": dict(_REFERENCE, dataset="CIFAR100", num_classes=100),
    "svhn": dict(_REFERENCE, dataset="SVHN", num_classes=10),
    "tiny-imagenet": dict(_REFERENCE, dataset="imagefolder:tiny-imagenet-200", num_classes=200,
                          image_size=64),
    # Seconds-fast: scikit-learn's bundled 8x8 digits, small conv nets; the --smoke-test preset.
    # Chosen on validation (docs/results/presets.md): no memory, latent 100, a slow generator, and
    # 25 short epochs (~30 s on one thread), so that tests and searches cutting epochs stay short.
    # Its ConvNet teacher has BatchNorm, so the BatchNorm prior (w_bn, default 1) applies.
    "digits": dict(
        dataset="digits", num_classes=10, image_size=8, channels=1,
        teacher_arch="convnet", student_arch="convnet_half",
        batch_size=64, latent_dim=100, generator_width=32, gen_steps=1, kd_steps=5,
        iters_per_epoch=20, epochs=25, student_lr=0.1, generator_lr=1e-4, meta_lr=0.1,
        memory_capacity=0, memory_push_every=1, memory_push_size=16, eval_batch_size=512,
        teacher_epochs=30, teacher_lr=3e-3, teacher_batch_size=64,
    ),
}


def preset(name: str, **overrides: Any) -> LRRAConfig:
    """The named preset, with optional field overrides (CLI strings are coerced)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    values = dict(PRESETS[name], preset=name)
    check_field_names(overrides)
    values.update({k: coerce(k, v) for k, v in overrides.items()})
    return LRRAConfig(**values)


# What may differ between a checkpoint and the run that resumes it. Everything else is the run's
# identity: resuming with another learning rate, memory or loss weight would silently mix two
# configurations. Paths may move (another machine, another Ray session's working folder);
# ``epochs`` may grow, and the cosine schedule is rebuilt for the new length.
# Fields that older checkpoints and search plans hold, read and ignored: the tests' fault switches,
# now in lrra/fault_injection.py.
RETIRED_FIELDS = frozenset({"fault_at_epoch", "nan_at_epoch"})

RESUMABLE_CHANGES = {
    "epochs": "may grow (the cosine schedule continues over the new length from the epoch reached)",
    "checkpoint_every": "how often checkpoints are written",
    "eval_batch_size": "evaluation batching only",
    "device": "where the run computes",
    "data_dir": "where the same dataset is found",
    "teacher_path": "where the same teacher is found",
}


def check_resumable(saved: LRRAConfig, new: LRRAConfig, epochs_done: int) -> None:
    """ConfigError naming every field that keeps ``new`` from continuing a checkpoint of ``saved``."""
    differing = [f"{name} (checkpoint {getattr(saved, name)!r}, now {getattr(new, name)!r})"
                 for name in FIELD_TYPES
                 if name not in RESUMABLE_CHANGES and getattr(saved, name) != getattr(new, name)]
    if differing:
        raise ConfigError(f"cannot resume: {', '.join(differing)} differ from the checkpoint's configuration; "
                          f"only {', '.join(RESUMABLE_CHANGES)} may change on resume")
    if new.epochs < epochs_done:
        raise ConfigError(f"cannot resume: config field 'epochs' = {new.epochs} is below the {epochs_done} "
                          "epochs the checkpoint has already run")


def parse_assignments(items: list[str]) -> dict[str, str]:
    """['a=1', 'b=x'] -> {'a': '1', 'b': 'x'}, with a clear error for a malformed item."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--set expects field=value, got {item!r}")
        out[name.strip()] = value.strip()
    return out


__all__ = ["ConfigError", "LRRAConfig", "PRESETS", "RESUMABLE_CHANGES", "check_resumable", "preset", "describe",
           "parse_assignments"]
