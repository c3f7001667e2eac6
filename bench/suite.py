"""What ``python -m bench`` measures, for one teacher -> student pair at one batch.

- the student update alone (``lrra.meta.student_update``; teacher outputs precomputed, outside the
  timed region): plain KD on the fresh batch, retention order 0, 1 and 2, and, when ``higher``
  is installed, the authors' order-2 update (``bench/authors_update.py``) on the same batch;
- one generator step and one full iteration (``gen_steps`` generator steps + ``kd_steps`` student
  steps with a non-empty memory, i.e. every student step the full LRRA update) of the real
  ``Distiller``, teacher forwards and synthesis included;
- each a median over interleaved rounds after warm-up, and the peak memory of one more call.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from bench.peak_memory import peak_growth_mib
from bench.timing import interleaved_medians
from lrra.config import LRRAConfig, preset
from lrra.meta import student_update
from lrra.models import build_classifier
from lrra.train import Distiller

# The MNIST pair at the mnist preset's batch; ResNet-34 -> ResNet-18 at the reference batch
# (cifar100, docs/design.md §3).
PAIRS = {"mnist": "mnist", "resnet": "cifar100"}
UPDATES = ("plain_kd", "order0", "order1", "order2")
AUTHORS = "authors_order2"


def authors_available() -> bool:
    try:
        import higher  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Settings:
    device: torch.device
    rounds: int
    reps: int
    warmup: int
    bf16: bool = LRRAConfig.bf16
    channels_last: bool = LRRAConfig.channels_last  # a run's defaults


def pair_config(pair: str, settings: Settings, **fields) -> LRRAConfig:
    """The pair's preset with config ``fields`` changed; a changed ``batch_size`` scales the memory
    batch as the preset's (B/8). An epoch is one iteration, so the Distiller's epoch is an iteration."""
    cfg = preset(PAIRS[pair])
    overrides = dict(iters_per_epoch=1, memory_push_every=1, checkpoint_every=0, device=str(settings.device),
                     bf16=settings.bf16, channels_last=settings.channels_last, **fields)
    if "batch_size" in fields:
        overrides["memory_push_size"] = max(1, fields["batch_size"] * cfg.memory_push_size // cfg.batch_size)
    return preset(PAIRS[pair], **overrides)


def _autocast(cfg: LRRAConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()


def update_steps(cfg: LRRAConfig, teacher: torch.nn.Module, device: torch.device) -> dict[str, Callable[[], object]]:
    """One student update per variant, each on its own copy of one student, all on the same batch."""
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    torch.manual_seed(cfg.seed)
    student = build_classifier(cfg.student_arch, cfg.num_classes, cfg.channels).to(device, memory_format=fmt).train()
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    x_new = torch.randn(cfg.batch_size, *shape, device=device).contiguous(memory_format=fmt)
    x_mem = torch.randn(cfg.memory_push_size * cfg.replay_batches, *shape, device=device).contiguous(memory_format=fmt)
    with torch.no_grad(), _autocast(cfg, device):
        y_new, y_mem = teacher(x_new).float(), teacher(x_mem).float()

    def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=cfg.student_lr, momentum=cfg.student_momentum,
                               weight_decay=cfg.weight_decay)

    def ours(variant: str) -> Callable[[], object]:
        model = copy.deepcopy(student)
        optimizer = optimizer_for(model)
        order = 2 if variant == "plain_kd" else int(variant[-1])
        memory = (None, None) if variant == "plain_kd" else (x_mem, y_mem)

        def step() -> object:
            with _autocast(cfg, device):
                return student_update(model, optimizer, x_new, y_new, *memory, meta_lr=cfg.meta_lr,
                                      weight_decay=cfg.weight_decay, retention_order=order)
        return step

    steps = {variant: ours(variant) for variant in UPDATES}
    if authors_available():
        from bench.authors_update import AuthorsUpdate

        model = copy.deepcopy(student)
        authors = AuthorsUpdate(model, optimizer_for(model), meta_lr=cfg.meta_lr, weight_decay=cfg.weight_decay)

        def authors_step() -> object:
            with _autocast(cfg, device):
                return authors(x_new, y_new, x_mem, y_mem)
        steps[AUTHORS] = authors_step
    return steps


def loop_steps(cfg: LRRAConfig, teacher: torch.nn.Module, device: torch.device) -> dict[str, Callable[[], object]]:
    """The real Distiller's generator step and one iteration (an epoch of one iteration, no evaluation)."""
    distiller = Distiller(cfg, teacher, device=device)
    distiller.train_epoch()  # fills the memory: every later student step is the full LRRA update
    return {"generator_step": distiller.generator_step, "iteration": distiller.train_epoch}


def measure_pair(pair: str, settings: Settings, **fields) -> dict:
    """Median seconds, ratios, images/s and peak memory of one pair (preset ``fields`` changed); JSON-ready."""
    cfg = pair_config(pair, settings, **fields)
    device = settings.device
    torch.manual_seed(cfg.seed)
    teacher = build_classifier(cfg.teacher_arch, cfg.num_classes, cfg.channels).to(device).eval()
    teacher.requires_grad_(False)  # speed does not depend on what the teacher knows: random weights
    steps = {**update_steps(cfg, teacher, device), **loop_steps(cfg, teacher, device)}
    seconds = interleaved_medians(steps, rounds=settings.rounds, reps=settings.reps, warmup=settings.warmup,
                                  device=device)
    peak = {name: peak_growth_mib(step, device) for name, step in steps.items()}
    base = seconds["plain_kd"]
    reference = preset(PAIRS[pair])
    result = {
        "teacher": cfg.teacher_arch, "student": cfg.student_arch, "preset": cfg.preset,
        "image_size": cfg.image_size, "batch": cfg.batch_size, "preset_batch": reference.batch_size,
        "memory_batch": cfg.memory_push_size * cfg.replay_batches, "retention_order": cfg.retention_order,
        "gen_steps": cfg.gen_steps, "kd_steps": cfg.kd_steps,
        "ms": {name: s * 1e3 for name, s in seconds.items()},
        "ratio_to_plain_kd": {name: seconds[name] / base for name in steps if name in UPDATES or name == AUTHORS},
        "images_per_s": cfg.kd_steps * cfg.batch_size / seconds["iteration"],
        "peak_mib": peak,
        # The preset's whole schedule at the measured iteration time (evaluation not included).
        "projected_schedule_h": seconds["iteration"] * reference.iters_per_epoch * reference.epochs / 3600,
    }
    if AUTHORS in seconds:
        result["order2_over_authors"] = seconds["order2"] / seconds[AUTHORS]
    return result
