"""DeepInversion's BatchNorm-statistics prior (lrra/batchnorm_prior.py): its value against a hand
computation, silence outside a recording, and its effect on the generator only when weighted."""

import torch
from torch import nn

from lrra.batchnorm_prior import BatchNormPrior, batchnorm_layers
from lrra.config import preset
from lrra.models import PixelsToInput, build_classifier
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
    cfg = preset("digits", batch_size=16, w_bn=0.5, generator_output="batchnorm")  # one generator for both
    teacher = build_classifier("convnet", 10, 1).eval()
    with_prior = Distiller(cfg, teacher)
    parts = with_prior.generator_step()
    assert parts["gen_bn_statistics"] > 0
    others = parts["generator"] - 0.5 * parts["gen_bn_statistics"]
    plain = Distiller(cfg.replace(w_bn=0.0), teacher).generator_step()  # the same seed: the same first batch
    assert "gen_bn_statistics" not in plain
    assert torch.allclose(others, plain["generator"], atol=1e-5)


def test_with_the_prior_the_generator_ends_in_pixels_under_the_teachers_normalisation():
    cfg = preset("digits", batch_size=16, generator_output="auto")  # the digits preset opts out
    mean, std = (0.3,), (0.2,)
    with_prior = Distiller(cfg, build_classifier("convnet", 10, 1).eval(), teacher_meta={"mean": mean, "std": std})
    assert isinstance(with_prior.generator.body[-1], PixelsToInput)
    images = with_prior._synthesise(64)
    low, high = (0 - mean[0]) / std[0], (1 - mean[0]) / std[0]  # pixels 0 and 1, normalised
    assert low - 1e-5 <= images.min() < images.max() <= high + 1e-5
    # no prior (a teacher without BatchNorm, or w_bn=0): DAFL's affine-free BatchNorm, zero mean
    for plain in (Distiller(cfg, build_classifier("lenet5", 10, 1).eval()),
                  Distiller(cfg.replace(w_bn=0.0), build_classifier("convnet", 10, 1).eval())):
        last = plain.generator.body[-1]
        assert isinstance(last, nn.BatchNorm2d) and not last.affine
        assert abs(float(plain._synthesise(64).detach().mean())) < 1e-4


def test_the_warm_up_trains_the_generator_alone_and_only_with_the_prior():
    cfg = preset("digits", batch_size=16, generator_output="auto", generator_warmup_steps=3, generator_warmup_lr=5e-3)
    distiller = Distiller(cfg, build_classifier("convnet", 10, 1).eval())
    student = [p.detach().clone() for p in distiller.student.parameters()]
    generator = [p.detach().clone() for p in distiller.generator.parameters()]
    distiller.warm_up_generator()
    steps = {int(state["step"]) for state in distiller.opt_generator.state.values()}
    assert steps == {3}
    assert not any(torch.equal(a, b) for a, b in zip(generator, distiller.generator.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(student, distiller.student.parameters(), strict=True))
    assert distiller.opt_generator.param_groups[0]["lr"] == cfg.generator_lr  # back to the adversarial rate
    without_prior = Distiller(cfg, build_classifier("lenet5", 10, 1).eval())
    without_prior.warm_up_generator()
    assert not without_prior.opt_generator.state  # no step taken


def _exported(net: nn.Module, example: torch.Tensor, dynamic_batch: bool) -> bytes:
    import io

    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=shapes), buffer)
    return buffer.getvalue()


def test_an_exported_teacher_gets_the_same_prior_as_its_module():
    from lrra.external_models import load_exported

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6),
                        nn.Flatten(), nn.Linear(6 * 2 * 2, 3)).eval()
    for layer in (net[1], net[4]):
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    x = torch.randn(8, 1, 6, 6)
    exported = load_exported(_exported(net, x, dynamic_batch=True))
    module_prior, exported_prior = BatchNormPrior(net), BatchNormPrior(exported)
    assert exported_prior.available and len(exported_prior.layers) == 2
    with module_prior.recording() as expected:
        net(x)
    with exported_prior.recording() as terms:
        logits, features = exported(x, return_features=True)
    assert torch.allclose(logits, net(x), atol=1e-5) and features.shape == (8, 24)
    assert torch.allclose(torch.stack(terms), torch.stack(expected), atol=1e-5)
    # exported for one fixed batch, chunks are padded with zeros: no prior rather than a wrong one
    assert not BatchNormPrior(load_exported(_exported(net, x, dynamic_batch=False))).available


def test_the_runs_first_line_counts_the_teachers_batchnorm_layers_without_hooking_them(caplog):
    from lrra.teacher import log_batchnorm_prior

    teacher = build_classifier("convnet", 10, 1).eval()
    with caplog.at_level("INFO", logger="lrra"):
        log_batchnorm_prior(preset("digits"), teacher, {"format": "lrra"})
    assert not any(m._forward_hooks for m in teacher.modules())  # the Distiller's prior is the only one
    layers = batchnorm_layers(teacher)
    assert layers and f"the teacher has {len(layers)} BatchNorm layers" in caplog.text
