"""Validation chooses, test reports: the splits, and that a run's choices follow validation alone."""

import torch
from torch.utils.data import TensorDataset

from lrra.config import preset
from lrra.data import load_split
from lrra.splits import TEST_HALF, TRAIN_HOLDOUT, EvaluationSplits, evaluation_splits, teacher_training_split
from lrra.teacher import load_teacher
from lrra.train import Distiller


def rows(dataset: TensorDataset) -> set[bytes]:
    return {image.numpy().tobytes() for image in dataset.tensors[0]}


def test_a_teacher_trained_here_never_sees_the_validation_images(digits_teacher):
    path, meta = digits_teacher
    cfg = preset("digits")
    # The saved metadata says which images were held out; rebuilding both sides from it...
    assert meta["validation"]["rule"] == TRAIN_HOLDOUT and meta["validation"]["holdout"] == 144
    trained_on, _ = teacher_training_split(cfg)
    splits = evaluation_splits(cfg, meta)
    train = load_split("digits", cfg.data_dir, True, 8, 1)
    # ...they are disjoint, and together they are the whole training split.
    assert not rows(trained_on) & rows(splits.validation)
    assert len(trained_on) + len(splits.validation) == len(train)
    assert rows(trained_on) | rows(splits.validation) == rows(train)
    assert len(splits.test) == len(load_split("digits", cfg.data_dir, False, 8, 1))  # the whole test split reports


def test_another_teacher_validates_on_half_the_test_split():
    cfg = preset("digits")
    splits = evaluation_splits(cfg, {"arch": "convnet"})  # no record of what it trained on
    test = load_split("digits", cfg.data_dir, False, 8, 1)
    assert splits.rule == TEST_HALF and not rows(splits.validation) & rows(splits.test)
    assert rows(splits.validation) | rows(splits.test) == rows(test)
    again = evaluation_splits(cfg, {})
    assert torch.equal(again.validation.tensors[0], splits.validation.tensors[0])  # fixed, whatever the run's seed


def test_best_epoch_and_best_student_follow_validation_not_test(digits_teacher):
    """Plant a disagreement: labels permuted in one split. The choice must track validation."""
    path, meta = digits_teacher
    cfg = preset("digits", teacher_path=str(path), epochs=4)
    teacher, _ = load_teacher(path, cfg)
    real = evaluation_splits(cfg, meta)
    images, labels = real.validation.tensors
    shuffled = TensorDataset(images, labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))])

    honest = Distiller(cfg, teacher, EvaluationSplits(real.validation, shuffled, TRAIN_HOLDOUT),
                       device=torch.device("cpu"))
    noisy = Distiller(cfg, teacher, EvaluationSplits(shuffled, real.validation, TRAIN_HOLDOUT),
                      device=torch.device("cpu"))
    for distiller in (honest, noisy):
        distiller.run()
        assert distiller.best_epoch == max(range(4), key=lambda e: (distiller.accuracies[e], -e))
    # Same training (same seed, same data), different validation labels: different choices.
    assert honest.accuracies != noisy.accuracies
    assert honest.test_accuracy < 0.3 < honest.best_accuracy  # the shuffled test only reports
    assert noisy.best_accuracy < 0.3  # chosen on noise, and reported as such
