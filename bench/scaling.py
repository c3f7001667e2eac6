"""Throughput of the distillation loop: bare single process vs Ray Train with 1, 2, ... workers.

Each configuration runs the same short distillation (random-init teacher: speed does not depend
on what the teacher knows) and is timed on its last epoch, when the replay memory is non-empty and
every student step is the full LRRA update. Under Ray Train the speeds are the reported, reduced
metrics: student steps/s is the mean over ranks, images/s their sum (each rank its own batch B).

    python -m bench.scaling                          # mnist shapes on CPU: bare, 1 and 2 workers
    python -m bench.scaling --smoke-test             # digits, seconds of work (Ray startup dominates)
    python -m bench.scaling --preset cifar100 --gpu --workers 1   # ResNet-34 -> ResNet-18, B=512

It also prices the collective that makes N workers take the step of one process on the union of
their batches (the acquisition gradient's differentiable all-reduce inside every LRRA step): on
the largest worker count, epochs with it and without it (the per-rank fast weights of the
authors' code, a different update) alternate in the same worker group, and the ratio of their
median times is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time

import ray
import torch

from lrra import distributed
from lrra.collectives import RAY_TRAIN_COLLECTIVES
from lrra.config import parse_assignments, preset
from lrra.distributed import build_trainer
from lrra.models import build_classifier
from lrra.preflight import check_cluster_fits, worker_resources
from lrra.train import Distiller

CPUS_PER_WORKER = 1


def bench_config(args: argparse.Namespace):
    # Memory pushed after every epoch, so the timed last epoch replays it; no test set, no
    # intermediate checkpoints: only the loop itself is measured.
    # A memory of 10 pushes whatever the preset's default (the presets have none): the point is the
    # LRRA step across workers, replayed batch included.
    overrides = dict(epochs=args.epochs, iters_per_epoch=args.iters, memory_capacity=10, memory_push_every=1,
                     checkpoint_every=0)
    if args.smoke_test:
        overrides.update(batch_size=16, memory_push_size=8, iters_per_epoch=2)
    overrides.update(parse_assignments(args.overrides))
    return preset(args.preset or ("digits" if args.smoke_test else "mnist"), **overrides)


def random_teacher(cfg) -> tuple[dict, dict]:
    torch.manual_seed(cfg.seed)
    teacher = build_classifier(cfg.teacher_arch, cfg.num_classes, cfg.channels)
    meta = {"arch": cfg.teacher_arch, "dataset": cfg.dataset, "num_classes": cfg.num_classes,
            "channels": cfg.channels, "image_size": cfg.image_size, "test_accuracy": 0.0}
    return teacher.state_dict(), meta


def bare_loop(cfg, teacher_state: dict, use_gpu: bool) -> dict[str, float]:
    """The Distiller alone in this process: no Ray, no collectives."""
    if not use_gpu:
        torch.set_num_threads(CPUS_PER_WORKER)  # as many threads as a Ray worker gets (OMP_NUM_THREADS)
    teacher = build_classifier(cfg.teacher_arch, cfg.num_classes, cfg.channels)
    teacher.load_state_dict(teacher_state)
    distiller = Distiller(cfg, teacher, device=torch.device("cuda" if use_gpu else "cpu"))
    return distiller.run()


def ray_train(cfg, teacher_state: dict, meta: dict, workers: int, use_gpu: bool, storage: str) -> dict[str, float]:
    resources = {"CPU": CPUS_PER_WORKER}
    check_cluster_fits(workers, worker_resources(use_gpu, resources))
    trainer = build_trainer(cfg, teacher_state, meta, workers=workers, use_gpu=use_gpu,
                            resources_per_worker=resources, storage_path=storage,
                            name=f"scaling-{workers}w-{time.strftime('%H%M%S')}")
    return trainer.fit().metrics  # the last epoch's, attached to the final checkpoint


def time_acquisition_collective(config: dict) -> dict[str, float]:
    """Ray Train function: epoch times with and without the acquisition all-reduce, alternating."""
    distiller = distributed.worker_distiller(config)
    distiller.train_epoch()  # fills the memory: every later student step is the full LRRA update
    without = dataclasses.replace(RAY_TRAIN_COLLECTIVES, mean_over_ranks=None)
    times: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(config["repeats"]):
        for label, collectives in (("with", RAY_TRAIN_COLLECTIVES), ("without", without)):
            distiller.collectives = collectives
            times[label].append(distiller.train_epoch()["perf/epoch_s"])
    return {f"epoch_s_{label}": statistics.median(t) for label, t in times.items()}


def acquisition_collective_cost(cfg, teacher_state: dict, meta: dict, workers: int, use_gpu: bool,
                                storage: str, repeats: int = 3) -> dict[str, float]:
    """Median epoch seconds with and without the acquisition all-reduce, and their ratio."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config = {**distributed.train_loop_config(cfg, teacher_state, meta), "repeats": repeats}
    trainer = TorchTrainer(time_acquisition_collective, train_loop_config=config,
                           torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                           scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                        resources_per_worker={"CPU": CPUS_PER_WORKER}),
                           run_config=RunConfig(name=f"collective-{time.strftime('%H%M%S')}", storage_path=storage))
    metrics = trainer.fit().return_value  # rank 0's; every rank timed the same collective steps
    return {**metrics, "ratio": metrics["epoch_s_with"] / metrics["epoch_s_without"]}


def row(label: str, workers: int, metrics: dict[str, float], base: float) -> dict:
    images = metrics["perf/images_per_s"]
    return {"run": label, "workers": workers, "student_steps_per_s": round(metrics["perf/student_steps_per_s"], 2),
            "images_per_s": round(images, 1), "images_per_s_vs_1_worker": round(images / base, 3) if base else None}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'run':<16} {'workers':>7} {'steps/s':>9} {'images/s':>10} {'vs 1 worker':>12}")
    for r in rows:
        ratio = f"{r['images_per_s_vs_1_worker']:.2f}" if r["images_per_s_vs_1_worker"] is not None else "-"
        print(f"{r['run']:<16} {r['workers']:>7} {r['student_steps_per_s']:>9.2f} {r['images_per_s']:>10.1f} "
              f"{ratio:>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="shapes to time (default: mnist, LeNet-5 -> LeNet-5-half; "
                                         "digits with --smoke-test); rank 0 evaluates on its test set")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train sizes (default: 1 2)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker; the bare loop runs on cuda")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is timed (default: 2)")
    parser.add_argument("--iters", type=int, default=3, help="iterations per epoch (default: 3)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override, e.g. --set bf16=true --set channels_last=false")
    parser.add_argument("--smoke-test", action="store_true", help="tiny batches and epochs, for CI")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: this machine has no CUDA device")

    cfg = bench_config(args).with_absolute_paths()
    teacher_state, meta = random_teacher(cfg)
    where = torch.cuda.get_device_name() if args.gpu else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    print(f"{cfg.teacher_arch} -> {cfg.student_arch}, B={cfg.batch_size} per worker, {cfg.iters_per_epoch} "
          f"iterations x {cfg.kd_steps} student steps per epoch, last of {cfg.epochs} epochs timed; {where}")

    bare = bare_loop(cfg, teacher_state, args.gpu)
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory(prefix="lrra-scaling-") as storage:
            runs = {w: ray_train(cfg, teacher_state, meta, w, args.gpu, storage) for w in args.workers}
            collective = (acquisition_collective_cost(cfg, teacher_state, meta, max(args.workers), args.gpu, storage)
                          if max(args.workers) > 1 else None)
    finally:
        ray.shutdown()

    base = runs[1]["perf/images_per_s"] if 1 in runs else 0.0
    rows = [row("bare loop", 1, bare, base)] + [row("ray train", w, m, base) for w, m in runs.items()]
    print_table(rows)
    if collective is not None:
        print(f"\nacquisition all-reduce, {max(args.workers)} workers: epoch {collective['epoch_s_with']:.2f} s "
              f"with, {collective['epoch_s_without']:.2f} s without: {collective['ratio']:.3f}x "
              "(medians of alternating epochs)")
    print(json.dumps({"device": where, "preset": cfg.preset, "batch_per_worker": cfg.batch_size, "rows": rows,
                      "acquisition_collective": collective}))


if __name__ == "__main__":
    main()
