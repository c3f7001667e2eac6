"""Train a teacher the way a user trains one: plain PyTorch, none of this project's models or trainers.

    python examples/own_teacher.py --arch resnet18 --dataset letters --out data/own/letters-resnet18.pt
    python examples/own_teacher.py --arch bn-net --dataset greek --out data/own/greek-bn-net.pt2

``resnet18`` is torchvision's ResNet-18 on 32 px colour input with ImageNet's normalisation (a grey
dataset repeated to three channels), saved as a plain ``state_dict``: distil it with
``--set teacher_arch=torchvision:resnet18``. ``bn-net`` is a small network with BatchNorm written
here, on 28 px grey input normalised with 0.5/0.5, saved as a torch.export archive with a free
batch dimension. Each run prints the ``--set`` flags that state its input contract, which is what
a user has to tell ``lrra`` about a teacher trained elsewhere (docs/own-model.md).

The only thing taken from ``lrra`` is the images (``lrra.data.load_split``, in [0, 1]), so that
the offline datasets of this project can be used; the teacher trains on the whole training split.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lrra.data import load_split

CONTRACTS = {  # arch -> (image side, channels, mean, std)
    "resnet18": (32, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "bn-net": (28, 1, (0.5,), (0.5,)),
}


class BatchNormNet(nn.Module):
    """Three convolution blocks with BatchNorm, global pooling and a linear head."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()

        def block(inputs: int, outputs: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs),
                                 nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(channels, 32), block(32, 64), block(64, 128),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def pixels(dataset: str, train: bool, side: int, channels: int, data_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    split = load_split(dataset, data_dir, train, side, channels, mean=(0.0,) * channels, std=(1.0,) * channels)
    images, labels = split.tensors
    return images, labels


def shifted(images: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Random translations by up to ``pad`` pixels, one per batch (cheap augmentation)."""
    dx, dy = torch.randint(-pad, pad + 1, (2,)).tolist()
    return torch.roll(F.pad(images, (pad,) * 4), shifts=(dy, dx), dims=(2, 3))[..., pad:-pad, pad:-pad]


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    batches = zip(images.split(500), labels.split(500), strict=True)
    hits = sum((model(x).argmax(1) == y).sum().item() for x, y in batches)
    return hits / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=sorted(CONTRACTS), required=True)
    parser.add_argument("--dataset", required=True, help="a dataset lrra can open, e.g. letters, greek, MNIST")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    side, channels, mean, std = CONTRACTS[args.arch]
    normalise = lambda x: (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)  # noqa: E731
    train_images, train_labels = pixels(args.dataset, True, side, channels, args.data_dir)
    test_images, test_labels = pixels(args.dataset, False, side, channels, args.data_dir)
    classes = int(train_labels.max()) + 1
    model = (torchvision.models.resnet18(num_classes=classes) if args.arch == "resnet18"
             else BatchNormNet(channels, classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    steps = args.epochs * -(-len(train_labels) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(train_labels)).split(128):
            loss = F.cross_entropy(model(normalise(shifted(train_images[batch]))), train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        test_accuracy = accuracy(model, normalise(test_images), test_labels)
        print(f"epoch {epoch + 1}/{args.epochs}: test accuracy {test_accuracy:.4f} ({time.time() - start:.0f} s)",
              flush=True)

    model.eval()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.arch == "resnet18":
        torch.save(model.state_dict(), args.out)
        arch_flag = " --set teacher_arch=torchvision:resnet18"
    else:
        example = (torch.zeros(2, channels, side, side),)
        program = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, args.out)
        arch_flag = ""
    print(f"wrote {args.out}; distil it with:\n  --teacher {args.out} --set dataset={args.dataset}{arch_flag}"
          f" --set image_size={side} --set channels={channels}"
          f" --set input_mean={','.join(map(str, mean))} --set input_std={','.join(map(str, std))}")


if __name__ == "__main__":
    main()
