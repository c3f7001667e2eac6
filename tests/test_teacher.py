"""Teacher training augments each dataset as its images allow: digits are never mirrored."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from lrra import teacher
from lrra.config import preset


class InputRecorder(nn.Module):
    """A linear classifier that keeps every batch it is trained on."""

    def __init__(self, num_classes: int, channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels * 32 * 32, num_classes)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append(x.detach().clone())
        return self.fc(x.flatten(1))


def images_seen_in_training(preset_name: str, monkeypatch) -> torch.Tensor:
    """What one epoch of train_teacher feeds the model, on 64 copies of a left-to-right ramp.

    Pixel (row, column) holds column - 15.5 plus a little noise: a mirrored image decreases
    from left to right, a cropped one is shifted by up to 4 columns.
    """
    ramp = torch.arange(32.0).sub(15.5).expand(64, 3, 32, 32)
    images = ramp + 0.01 * torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    split = TensorDataset(images, torch.arange(64) % 10)
    monkeypatch.setattr(teacher, "teacher_training_split", lambda cfg: (split, {}))
    monkeypatch.setattr(teacher, "load_split", lambda *args, **kwargs: split)
    recorder = InputRecorder(10, 3)
    monkeypatch.setattr(teacher, "build_classifier", lambda arch, classes, channels: recorder)
    cfg = preset(preset_name, teacher_epochs=1, teacher_batch_size=16, device="cpu")
    teacher.train_teacher(cfg)
    return torch.cat(recorder.seen)


def left_to_right(images: torch.Tensor) -> torch.Tensor:
    """+1 per image that still rises from left to right, -1 per mirrored one."""
    return torch.sign(images[..., 20:28].mean(dim=(1, 2, 3)) - images[..., 4:12].mean(dim=(1, 2, 3)))


def test_svhn_teacher_crops_but_never_mirrors_while_cifar_teachers_do(monkeypatch):
    svhn = images_seen_in_training("svhn", monkeypatch)
    cifar = images_seen_in_training("cifar10", monkeypatch)
    assert len(svhn) == len(cifar) == 64

    assert (left_to_right(svhn) == 1).all(), "an SVHN digit was mirrored"
    mirrored = (left_to_right(cifar) == -1).sum().item()
    assert 10 < mirrored < 54, f"CIFAR images should be mirrored half the time, got {mirrored}/64"

    # Both are randomly cropped: the centre column's value reveals each image's horizontal shift.
    for seen in (svhn, cifar):
        shifts = seen[:, 0, 16, 16].round().unique()
        assert len(shifts) > 3, f"images were not randomly cropped (centre values {shifts.tolist()})"
