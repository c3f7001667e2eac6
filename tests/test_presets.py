"""Presets whose data cannot be had offline still run the whole update on random tensors."""

import pytest
import torch
from torch.utils.data import TensorDataset

from lrra.config import preset
from lrra.models import build_classifier, build_generator
from lrra.presets import PRESETS
from lrra.splits import TEST_HALF, EvaluationSplits
from lrra.train import Distiller


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_models_build_with_the_right_shapes(name):
    cfg = preset(name)
    teacher = build_classifier(cfg.teacher_arch, cfg.num_classes, cfg.channels).eval()
    generator = build_generator(cfg.latent_dim, cfg.image_size, cfg.channels, cfg.generator_width)
    images = generator(torch.randn(2, cfg.latent_dim))
    assert images.shape == (2, cfg.channels, cfg.image_size, cfg.image_size)
    logits, features = teacher(images, return_features=True)
    assert logits.shape == (2, cfg.num_classes) and features.ndim == 2


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "tiny-imagenet"])
def test_one_iteration_on_random_tensors_passes_through_the_whole_update(name):
    # The preset's architectures and shapes, with a batch small enough for a CPU test.
    cfg = preset(name, batch_size=4, memory_push_size=2, latent_dim=16, generator_width=16,
                 iters_per_epoch=1, kd_steps=1, epochs=2, memory_push_every=1, eval_batch_size=4)
    teacher = build_classifier(cfg.teacher_arch, cfg.num_classes, cfg.channels)
    images = TensorDataset(torch.randn(6, cfg.channels, cfg.image_size, cfg.image_size),
                           torch.randint(cfg.num_classes, (6,)))
    distiller = Distiller(cfg, teacher, EvaluationSplits(images, images, TEST_HALF), device=torch.device("cpu"))
    before = [p.detach().clone() for p in distiller.student.parameters()]
    first = distiller.train_epoch()   # plain KD (memory empty), then a push
    second = distiller.train_epoch()  # full LRRA step with retention (order 2)
    assert first["memory/size"] == 1 and "loss/student_retention" in second
    assert second["val/best_epoch"] in (1, 2) and second["test/best_student_acc"] is not None
    assert any(not torch.equal(b, p) for b, p in zip(before, distiller.student.parameters(), strict=True))
