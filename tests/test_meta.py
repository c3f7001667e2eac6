"""The LRRA student update computes the real meta-gradient (docs/design.md §3)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrra.losses import kd_loss
from lrra.meta import student_objective, student_update
from lrra.models import build_classifier

ALPHA, WD = 0.7, 5e-4


class TinyMLP(nn.Module):
    """No BatchNorm, so the reference below can be written as plain tensor algebra."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(16, 12, generator=g, dtype=torch.float64) * 0.3)
        self.b1 = nn.Parameter(torch.randn(16, generator=g, dtype=torch.float64) * 0.1)
        self.w2 = nn.Parameter(torch.randn(5, 16, generator=g, dtype=torch.float64) * 0.3)
        self.b2 = nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64) * 0.1)

    def forward(self, x):
        return mlp(dict(self.named_parameters()), x)


def mlp(theta, x):
    return torch.tanh(x @ theta["w1"].T + theta["b1"]) @ theta["w2"].T + theta["b2"]


def batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    x_new, x_mem, y_new, y_mem = (torch.randn(*shape, generator=g, dtype=torch.float64)
                                  for shape in ((8, 12), (4, 12), (8, 5), (4, 5)))
    return x_new, y_new, x_mem, y_mem


def reference_gradient(model, x_new, y_new, x_mem, y_mem, order):
    """d/dtheta [ L_ret(theta - alpha*(grad L_acq(theta) + wd*theta)) + L_kd(theta) ], by hand."""
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    loss_acq = F.l1_loss(mlp(theta, x_new), y_new)
    grads = torch.autograd.grad(loss_acq, list(theta.values()), create_graph=True)
    if order == 1:
        grads = [g.detach() for g in grads]
    fast = {k: t - ALPHA * (g + WD * t) for (k, t), g in zip(theta.items(), grads, strict=True)}
    total = F.l1_loss(mlp(fast, x_mem), y_mem) + F.l1_loss(mlp(theta, torch.cat([x_new, x_mem])),
                                                             torch.cat([y_new, y_mem]))
    return torch.autograd.grad(total, list(theta.values()))


def applied_gradient(order, x_mem_present=True, weight=1.0):
    """The gradient student_update applies, read off a plain SGD(lr=1) step."""
    model = TinyMLP()
    before = [p.detach().clone() for p in model.parameters()]
    x_new, y_new, x_mem, y_mem = batches()
    if not x_mem_present:
        x_mem = y_mem = None
    student_update(model, torch.optim.SGD(model.parameters(), lr=1.0), x_new, y_new, x_mem, y_mem,
                   meta_lr=ALPHA, weight_decay=WD, retention_order=order, retention_weight=weight)
    return [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]


@pytest.mark.parametrize("order", [1, 2])
def test_update_equals_hand_written_meta_gradient(order):
    got = applied_gradient(order)
    want = reference_gradient(TinyMLP(), *batches(), order=order)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_second_order_differs_from_first_order_and_from_replay_only():
    second, first, replay = applied_gradient(2), applied_gradient(1), applied_gradient(0)
    assert max((a - b).abs().max().item() for a, b in zip(second, replay, strict=True)) > 1e-4
    assert max((a - b).abs().max().item() for a, b in zip(second, first, strict=True)) > 1e-6


def test_replay_only_is_plain_l1_kd_on_the_concatenated_batch():
    model = TinyMLP()
    x_new, y_new, x_mem, y_mem = batches()
    loss = F.l1_loss(model(torch.cat([x_new, x_mem])), torch.cat([y_new, y_mem]))
    want = torch.autograd.grad(loss, list(model.parameters()))
    for g, w in zip(applied_gradient(0), want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


@pytest.mark.parametrize("order", [1, 2])
def test_zero_retention_weight_is_the_replay_only_update(order):
    replay = applied_gradient(0)
    # Weight 0 skips the term; a vanishing weight goes through it, and must land on the same update.
    for weight in (0.0, 1e-9):
        for g, w in zip(applied_gradient(order, weight=weight), replay, strict=True):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("order", [1, 2])
def test_retention_weight_scales_only_the_retention_term(order):
    replay, full = applied_gradient(0), applied_gradient(order)
    assert max((f - r).abs().max().item() for f, r in zip(full, replay, strict=True)) > 1e-4
    for g, f, r in zip(applied_gradient(order, weight=0.3), full, replay, strict=True):
        torch.testing.assert_close(g, r + 0.3 * (f - r), atol=1e-10, rtol=0)


def test_empty_memory_is_plain_kd_on_the_fresh_batch():
    model = TinyMLP()
    x_new, y_new, _, _ = batches()
    want = torch.autograd.grad(F.l1_loss(model(x_new), y_new), list(model.parameters()))
    for g, w in zip(applied_gradient(2, x_mem_present=False), want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def test_sync_hook_sees_gradients_before_the_step():
    model = TinyMLP()
    seen = []
    student_update(model, torch.optim.SGD(model.parameters(), lr=1.0), *batches(), meta_lr=ALPHA,
                   weight_decay=WD, retention_order=2,
                   sync_grads=lambda params: seen.append([p.grad.clone() for p in params]))
    want = reference_gradient(TinyMLP(), *batches(), order=2)
    assert len(seen) == 1
    for g, w in zip(seen[0], want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_fast_weight_passes_leave_batchnorm_statistics_alone(order):
    torch.manual_seed(0)
    student = build_classifier("convnet_half", 10, 1).train()
    x_new, x_mem = torch.randn(16, 1, 8, 8), torch.randn(8, 1, 8, 8)
    y_new, y_mem = torch.randn(16, 10), torch.randn(8, 10)
    # What the running statistics must be: exactly one plain forward of the concatenated batch.
    expected = copy.deepcopy(student)
    with torch.no_grad():
        expected(torch.cat([x_new, x_mem]))
    student_objective(student, x_new, y_new, x_mem, y_mem, meta_lr=ALPHA, weight_decay=WD,
                      retention_order=order)
    for (name, got), want in zip(student.named_buffers(), expected.buffers(), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=f"buffer {name} moved")


@pytest.mark.parametrize("arch", ["lenet5_half", "convnet_half"])
def test_the_acquisition_loss_is_the_fresh_batch_on_its_own(arch):
    # LeNet has no BatchNorm, so its fresh-batch outputs are read off the plain KD forward; ConvNet's
    # BatchNorm must normalise the fresh batch by its own statistics, not the concatenated batch's.
    torch.manual_seed(0)
    student = build_classifier(arch, 10, 1).train()
    size = 32 if arch.startswith("lenet") else 8
    # A memory batch far from the fresh one, so that the two batch statistics differ clearly.
    x_new, x_mem = torch.randn(16, 1, size, size), 3 + 5 * torch.randn(8, 1, size, size)
    y_new, y_mem = torch.randn(16, 10), torch.randn(8, 10)
    alone = kd_loss(copy.deepcopy(student)(x_new), y_new).detach()
    _, parts = student_objective(student, x_new, y_new, x_mem, y_mem, meta_lr=ALPHA, weight_decay=WD,
                                 retention_order=2)
    torch.testing.assert_close(parts["acquisition"], alone)
    if arch == "convnet_half":  # the check can tell the two apart
        rows_of_concat = copy.deepcopy(student)(torch.cat([x_new, x_mem]))[:16]
        assert abs(alone - kd_loss(rows_of_concat, y_new).detach()) > 0.01


def test_clip_norm_rescales_the_applied_gradient_to_that_norm():
    want = reference_gradient(TinyMLP(), *batches(), order=2)
    norm = torch.sqrt(sum((w ** 2).sum() for w in want))
    model = TinyMLP()
    before = [p.detach().clone() for p in model.parameters()]
    student_update(model, torch.optim.SGD(model.parameters(), lr=1.0), *batches(), meta_lr=ALPHA,
                   weight_decay=WD, retention_order=2, clip_norm=float(norm) / 4)
    applied = [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]
    for got, full in zip(applied, want, strict=True):  # same direction, a quarter of the length
        torch.testing.assert_close(got, full / 4, atol=1e-6, rtol=1e-4)
