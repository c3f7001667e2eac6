"""One flat configuration for an LRRA distillation run: its fields, their parsing, presets by name.

The same object feeds the CLI (``--set field=value``), the Tune search space, MLflow params
and the checkpoint. Every field has a one-line docstring (the string under it); ``describe()``
reads them back for ``--help``-style listings. The rules each field must satisfy are in
lrra/config_validation.py, the presets' values in lrra/presets.py, and what may change when a
run resumes in lrra/config_resume.py.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import os
import re
from dataclasses import dataclass, fields
from typing import Any

from lrra.config_validation import check_fields
from lrra.presets import PRESETS


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
    generator_output: str = "auto"
    """How the generator's images end: batchnorm (DAFL's affine-free BatchNorm: zero mean and unit
    variance in the teacher's normalised space), pixels (tanh to pixel values in [0, 1], then the
    teacher's own normalisation, so that the BatchNorm prior can match its first layer), or auto:
    pixels when the BatchNorm prior is on, else batchnorm."""
    generator_warmup_steps: int = 300
    """Generator updates on the teacher's terms alone (no student, no adversarial term) before the
    first epoch, when the BatchNorm prior is on (ignored without it, and with gen_steps=0); 0 = none."""
    generator_warmup_lr: float = 1e-3
    """Generator Adam learning rate during that warm-up."""

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

    def validate(self) -> None:
        """Check every field against lrra/config_validation.py's rules; raise one ConfigError
        naming the first bad field."""
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"config field '{name}' = {getattr(self, name)!r} is invalid: {allowed}")

        check_fields(self, need)

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
    return dict(_field_docs())


@functools.cache  # the source does not change while a process runs; every command's parser reads it
def _field_docs() -> dict[str, str]:
    source = inspect.getsource(LRRAConfig)
    tree = ast.parse(source)
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, following in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            docs[node.target.id] = following.value.value  # type: ignore[union-attr]
    return docs


def preset(name: str, **overrides: Any) -> LRRAConfig:
    """The named preset, with optional field overrides (CLI strings are coerced)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    values = dict(PRESETS[name], preset=name)
    check_field_names(overrides)
    values.update({k: coerce(k, v) for k, v in overrides.items()})
    return LRRAConfig(**values)


# Fields that older checkpoints and search plans hold, read and ignored: the tests' fault switches,
# now in lrra/fault_injection.py.
RETIRED_FIELDS = frozenset({"fault_at_epoch", "nan_at_epoch"})


def parse_assignments(items: list[str]) -> dict[str, str]:
    """['a=1', 'b=x'] -> {'a': '1', 'b': 'x'}, with a clear error for a malformed item."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--set expects field=value, got {item!r}")
        out[name.strip()] = value.strip()
    return out


__all__ = ["ConfigError", "LRRAConfig", "preset", "describe", "parse_assignments"]
