"""DeepInversion's BatchNorm-statistics prior (lrra/batchnorm_prior.py): its value against a hand
computation, silence outside a recording, and its effect on the generator only when weighted."""

import torch
from torch import nn

from lrra.batchnorm_prior import BatchNormPrior
from lrra.config import preset
from lrra.models import build_classifier
from lrra.train import Distiller


def test_the_prior_is_the_distance_of_the_batch_statistics_to_the_running_ones():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)).eval()
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    prior = BatchNormPrior(net)
    x = torch.randn(8, 1, 6, 6)
    net(x)  # outside a recording: nothing is kept
    with prior.recording() as terms:
        net(x)
    features = net[0](x)
    mean, var = features.mean((0, 2, 3)), features.var((0, 2, 3), unbiased=False)
    expected = (mean - net[1].running_mean).norm() + (var - net[1].running_var).norm()
    assert len(terms) == 1 and torch.allclose(terms[0], expected)
    assert not BatchNormPrior(build_classifier("lenet5", 10, 1)).available  # LeNet-5 has no BatchNorm


def test_the_generator_step_adds_the_weighted_prior_and_logs_it():
    cfg = preset("digits", batch_size=16, w_bn=0.5)
    teacher = build_classifier("convnet", 10, 1).eval()
    with_prior = Distiller(cfg, teacher)
    parts = with_prior.generator_step()
    assert parts["gen_bn_statistics"] > 0
    others = parts["generator"] - 0.5 * parts["gen_bn_statistics"]
    plain = Distiller(cfg.replace(w_bn=0.0), teacher).generator_step()  # the same seed: the same first batch
    assert "gen_bn_statistics" not in plain
    assert torch.allclose(others, plain["generator"], atol=1e-5)
