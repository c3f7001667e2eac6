"""What only a CUDA device can check; every test here skips without one (CI has none).

`python -m bench.gpu` runs these (`pytest -m gpu`) with the GPU benchmarks, as one command sized
for a few minutes of a lent GPU.
"""

import math

import pytest
import torch

from lrra.config import preset
from lrra.models import build_classifier
from lrra.presets import PRESETS
from lrra.train import Distiller
from tests.test_meta import ALPHA, WD, TinyMLP, batches, reference_gradient

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("order", [1, 2])
def test_meta_gradient_on_cuda_matches_the_float64_cpu_reference(order):
    """The update's gradient in float32 on the GPU against the hand-written one in float64 on the CPU."""
    from lrra.meta import student_update

    model = TinyMLP().float().to(CUDA)
    before = [p.detach().clone() for p in model.parameters()]
    on_gpu = [t.float().to(CUDA) for t in batches()]
    student_update(model, torch.optim.SGD(model.parameters(), lr=1.0), *on_gpu, meta_lr=ALPHA, weight_decay=WD,
                   retention_order=order)
    applied = [(b - p.detach()).double().cpu() for b, p in zip(before, model.parameters(), strict=True)]
    for got, want in zip(applied, reference_gradient(TinyMLP(), *batches(), order=order), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def one_iteration(name: str, **fields) -> dict[str, float]:
    """One epoch of one iteration of preset ``name`` at its own shapes and batches, with an
    untrained teacher of its architecture (nothing to download, no data read)."""
    cfg = preset(name, iters_per_epoch=1, checkpoint_every=0, device="cuda", **fields)
    teacher = build_classifier(cfg.teacher_arch, cfg.num_classes, cfg.channels)
    return Distiller(cfg, teacher).train_epoch()


def assert_finite_losses(metrics: dict[str, float]) -> None:
    losses = {k: v for k, v in metrics.items() if k.startswith("loss/")}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_one_iteration_of_each_preset_at_its_own_shapes(name):
    assert_finite_losses(one_iteration(name))


@pytest.mark.parametrize("bf16, channels_last", [(True, True), (True, False), (False, True)])
def test_bf16_and_channels_last_steps_stay_finite(bf16, channels_last):
    for _ in range(3):
        # A memory push every iteration, so that epochs 2 and 3 take the order-2 step with a replay batch.
        assert_finite_losses(one_iteration("cifar100", bf16=bf16, channels_last=channels_last, batch_size=128,
                                           memory_push_size=16, memory_push_every=1))


@pytest.mark.slow
def test_a_one_worker_ray_train_run_with_nccl(tmp_path, digits_teacher):
    """The Ray Train path on the GPU: NCCL process group, the worker's CUDA device, a checkpoint and a student."""
    from lrra.distributed import run_distributed

    cfg = preset("digits", epochs=2, teacher_path=str(digits_teacher[0]), data_dir=str(tmp_path / "data"))
    summary = run_distributed(cfg, workers=1, use_gpu=True, storage_path=str(tmp_path / "runs"), name="nccl")
    assert summary["epochs"] == 2 and summary["best_val_acc"] > 0.2
    assert (tmp_path / "runs" / "nccl" / "best_student.pt").is_file()
