"""Cost of one LRRA student update, as a ratio to the plain KD step, measured side by side.

Variants: plain KD on the fresh batch (what a DFAD student step costs), and the LRRA update with
retention order 0 (replay only), 1 (first order) and 2 (second order, the paper). The teacher's
forward passes and the generator are outside the timed region: this is the student update alone.

    python bench/step_cost.py                       # both pairs, CPU-sized batches
    python bench/step_cost.py --device cuda --batch 512 --pairs resnet   # the reference batch on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from lrra.meta import student_update
from lrra.models import build_classifier

PAIRS = {
    "mnist": dict(teacher="lenet5", student="lenet5_half", channels=1, size=32, classes=10),
    "resnet": dict(teacher="resnet34", student="resnet18", channels=3, size=32, classes=100),
}
VARIANTS = ("plain_kd", "order0", "order1", "order2")


def make_step(pair: dict, batch: int, device: torch.device, variant: str):
    torch.manual_seed(0)
    teacher = build_classifier(pair["teacher"], pair["classes"], pair["channels"]).to(device).eval()
    student = build_classifier(pair["student"], pair["classes"], pair["channels"]).to(device).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    shape = (pair["channels"], pair["size"], pair["size"])
    x_new, x_mem = torch.randn(batch, *shape, device=device), torch.randn(batch // 8, *shape, device=device)
    with torch.no_grad():
        y_new, y_mem = teacher(x_new), teacher(x_mem)
    order = 2 if variant == "plain_kd" else int(variant[-1])
    memory = (None, None) if variant == "plain_kd" else (x_mem, y_mem)

    def step() -> None:
        student_update(student, optimizer, x_new, y_new, *memory, meta_lr=0.9, weight_decay=5e-4,
                       retention_order=order)
    return step


def time_variants(pair: dict, batch: int, device: torch.device, rounds: int, reps: int) -> dict[str, float]:
    """Median seconds per step; variants are interleaved round by round so drift hits all alike."""
    steps = {v: make_step(pair, batch, device, v) for v in VARIANTS}
    for step in steps.values():  # warm-up (allocator, cuDNN autotune)
        step()
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for variant, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(reps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples[variant].append((time.perf_counter() - start) / reps)
    return {v: statistics.median(s) for v, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--batch", type=int, help="fresh batch B (memory batch is B/8); default 512 on GPU, "
                                                  "256 (mnist) / 64 (resnet) on CPU")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--smoke-test", action="store_true", help="tiny batches, one round")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.smoke_test:
        args.rounds, args.reps = 1, 1

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device: {where}")
    results = {}
    for name in args.pairs:
        pair = PAIRS[name]
        batch = args.batch or (512 if device.type == "cuda" else (256 if name == "mnist" else 64))
        if args.smoke_test:
            batch = 16
        seconds = time_variants(pair, batch, device, args.rounds, args.reps)
        base = seconds["plain_kd"]
        print(f"\n{pair['teacher']} -> {pair['student']}, B={batch} fresh + {batch // 8} memory")
        print(f"  {'variant':<9} {'ms/step':>9} {'x plain KD':>11}")
        for variant in VARIANTS:
            print(f"  {variant:<9} {seconds[variant] * 1e3:9.1f} {seconds[variant] / base:11.2f}")
        results[name] = {"batch": batch, "ms": {v: round(s * 1e3, 2) for v, s in seconds.items()},
                         "ratio_to_plain_kd": {v: round(s / base, 3) for v, s in seconds.items()}}
    print(json.dumps({"device": where, **results}))


if __name__ == "__main__":
    main()
