"""What a teacher's format and the image size cost the generator.

``python -m bench.teachers`` measures, side by side in one process (interleaved medians):

* one generator step (the generator, the teacher with its features, the student, the backward)
  with the same teacher network as an ``nn.Module``, as a torch.export archive and as a TorchScript
  archive, each read the way a run reads it (lrra/teacher_files.py), ratios to the ``nn.Module``;
* the generator's parameters and one generator step at 28, 32, 64 and 224 px (a ConvNet teacher and
  student, which take any size).

Prints a table and writes JSON (``--out``). CPU unless ``--device cuda``.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
from pathlib import Path

import torch
from torch import nn

from bench.timing import interleaved_medians
from lrra.config import preset
from lrra.external_models import TappedClassifier, load_exported, load_torchscript
from lrra.models import build_classifier
from lrra.train import Distiller

SIZES = (28, 32, 64, 224)


class UsersNet(nn.Module):
    """A network written outside the project: convolutions with BatchNorm, a linear head."""

    def __init__(self, channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def teacher_formats(batch: int, side: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    net = UsersNet().eval()
    example = (torch.zeros(batch, 1, side, side),)
    exported, scripted = io.BytesIO(), io.BytesIO()
    torch.export.save(torch.export.export(net, example, dynamic_shapes=({0: torch.export.Dim("batch")},)), exported)
    torch.jit.save(torch.jit.trace(net, example), scripted)
    return {"nn.Module": TappedClassifier(net).eval(), "torch.export": load_exported(exported.getvalue()),
            "TorchScript": load_torchscript(scripted.getvalue())}


def generator_step_seconds(teachers: dict[str, nn.Module], cfg, device, rounds: int) -> dict[str, float]:
    distillers = {name: Distiller(cfg, teacher, device=device) for name, teacher in teachers.items()}
    return interleaved_medians({name: d.generator_step for name, d in distillers.items()}, rounds=rounds,
                               device=device)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.teachers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=128, help="synthetic images per generator step")
    parser.add_argument("--size-batch", type=int, default=16, help="images per step in the image-size table")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench-teachers.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # w_bn=0: a compiled teacher has no BatchNorm layers to hook, so the prior would be work the
    # nn.Module alone does; the formats are compared on the same objective.
    base = dict(student_arch="convnet_half", channels=1, device=args.device, channels_last=False, w_bn=0.0)

    cfg = preset("mnist", teacher_arch="convnet", image_size=32, batch_size=args.batch, **base)
    formats = generator_step_seconds(teacher_formats(args.batch, 32), cfg, device, args.rounds)
    sizes = {}
    for side in SIZES:
        cfg = preset("mnist", teacher_arch="convnet", image_size=side, batch_size=args.size_batch,
                     memory_push_size=min(16, args.size_batch), **base)
        teacher = build_classifier("convnet", 10, 1).eval()
        distiller = Distiller(cfg, teacher, device=device)
        seconds = interleaved_medians({"step": distiller.generator_step}, rounds=max(3, args.rounds // 2),
                                      device=device)["step"]
        sizes[side] = {"generator_parameters": sum(p.numel() for p in distiller.generator.parameters()),
                       "generator_step_s": seconds}

    result = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
              "threads": args.threads, "batch": args.batch, "size_batch": args.size_batch, "torch": torch.__version__,
              "machine": platform.machine(), "teacher_formats_s": formats,
              "teacher_format_ratio": {k: v / formats["nn.Module"] for k, v in formats.items()},
              "image_sizes": sizes}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"one generator step, batch {args.batch}, 32 px, {result['device']}, {args.threads} thread(s):")
    for name, seconds in formats.items():
        print(f"  teacher as {name:<12} {1000 * seconds:8.1f} ms  {seconds / formats['nn.Module']:.2f}x")
    print(f"the generator by image size (ConvNet teacher and student, batch {args.size_batch}):")
    for side, row in sizes.items():
        print(f"  {side:>4} px  {row['generator_parameters'] / 1e6:6.2f} M parameters  "
              f"{1000 * row['generator_step_s']:9.1f} ms a step")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
