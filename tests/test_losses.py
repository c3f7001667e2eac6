"""The loss terms: the Jensen-Shannon disagreement must stay finite (value and gradient) for any
finite logits, since a teacher's logits on generated images can be far larger than on real ones."""

import math

import pytest
import torch

from lrra.losses import generator_loss_terms, js_divergence


def reference_js(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """JS from its definition, in float64, for moderate logits."""
    p, q = logits_a.double().softmax(1), logits_b.double().softmax(1)
    m = (p + q) / 2
    kl = lambda x, y: (x * (x / y).log()).sum(1)  # noqa: E731
    return float((0.5 * kl(p, m) + 0.5 * kl(q, m)).mean())


def test_js_matches_its_definition_and_is_bounded_by_log_2():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    assert js_divergence(a, b).item() == pytest.approx(reference_js(a, b), rel=1e-5)
    assert js_divergence(a, a).item() == pytest.approx(0.0, abs=1e-6)
    far = torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]])
    assert js_divergence(*far).item() == pytest.approx(math.log(2), rel=1e-5)  # disjoint supports


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spread", [60.0, 120.0, 1e4])
def test_js_value_and_gradient_are_finite_for_extreme_logits(dtype, spread):
    # A spread of 120 underflows softmax to exactly 0 in float32; softmax -> log gave NaN gradients.
    student = torch.tensor([[spread / 2, -spread / 2, 0.0], [0.0, 1.0, 2.0]], dtype=dtype, requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0, 2.0], [-spread / 2, spread / 2, 0.0]], dtype=dtype, requires_grad=True)
    value = js_divergence(student, teacher)
    value.backward()
    assert torch.isfinite(value) and 0 < value.item() <= math.log(2) + 1e-3
    assert torch.isfinite(student.grad).all() and torch.isfinite(teacher.grad).all()


def test_generator_terms_have_finite_gradients_for_extreme_logits():
    logits = torch.tensor([[64.0, -64.0, 0.0, 10.0]] * 4, requires_grad=True)
    features = torch.randn(4, 8, requires_grad=True)
    student = torch.tensor([[-64.0, 64.0, 0.0, 0.0]] * 4, requires_grad=True)
    terms = generator_loss_terms(logits, features, student)
    sum(terms.values()).backward()
    for tensor in (logits, features, student):
        assert torch.isfinite(tensor.grad).all()
