"""Loss terms of LRRA: the student's distillation loss and the generator's objective.

Notation follows docs/design.md §3: teacher logits t, teacher penultimate features f,
student logits s, batch-mean teacher softmax p_bar.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """l: mean absolute error between student and teacher logits (L1, as in DFAD and LRRA)."""
    return F.l1_loss(student_logits, teacher_logits)


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between two softmax distributions, averaged over the batch.

    Computed from log-probabilities only: log m = logsumexp(log p, log q) - log 2, and each KL
    term takes its target in log space. A probability that underflows to exactly 0 (a logit
    spread of ~100 in float32) then contributes 0 * finite instead of the NaN gradient that
    softmax -> log would give, so the divergence and its gradient are finite for finite logits.
    """
    log_p, log_q = F.log_softmax(logits_a.float(), dim=1), F.log_softmax(logits_b.float(), dim=1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_pm = F.kl_div(log_m, log_p, reduction="batchmean", log_target=True)  # KL(p || m)
    kl_qm = F.kl_div(log_m, log_q, reduction="batchmean", log_target=True)  # KL(q || m)
    return 0.5 * (kl_pm + kl_qm)


def generator_loss_terms(teacher_logits: torch.Tensor, teacher_features: torch.Tensor | None,
                         student_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The four unweighted terms of L_G (each to be minimised, adversarial one included); without
    student logits (the generator's warm-up) the adversarial term is 0."""
    t = teacher_logits.float()
    p_bar = F.softmax(t, dim=1).mean(dim=0)
    return {
        # Confident teacher predictions on synthetic images: CE against the teacher's own argmax.
        "one_hot": F.cross_entropy(t, t.argmax(dim=1)),
        # Negative entropy of the batch-mean prediction: minimising it balances the classes.
        "info_entropy": (p_bar * p_bar.clamp_min(1e-12).log()).sum(),
        # Large penultimate activations, as real images excite the teacher (DAFL); 0 for a teacher
        # whose features cannot be read (a TorchScript archive).
        "activation": (-teacher_features.float().abs().mean() if teacher_features is not None
                       else t.new_zeros(())),
        # The generator *maximises* the teacher-student disagreement: minimise its negative.
        "adversarial": (-js_divergence(student_logits, teacher_logits) if student_logits is not None
                        else t.new_zeros(())),
    }


def generator_loss(terms: dict[str, torch.Tensor], w_oh: float, w_ie: float, w_a: float,
                   w_adv: float, w_bn: float = 0.0) -> torch.Tensor:
    """L_G = w_oh*one_hot + w_ie*info_entropy + w_a*activation + w_adv*adversarial (+ w_bn*bn_statistics,
    DeepInversion's prior, when the teacher has BatchNorm: lrra/batchnorm_prior.py)."""
    loss = (w_oh * terms["one_hot"] + w_ie * terms["info_entropy"] + w_a * terms["activation"]
            + w_adv * terms["adversarial"])
    return loss + w_bn * terms["bn_statistics"] if "bn_statistics" in terms else loss
