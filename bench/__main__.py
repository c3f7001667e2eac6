"""The benchmark suite: ``python -m bench`` prints a table and writes JSON.

For the MNIST pair (LeNet-5 -> LeNet-5-half, the mnist preset's batch) and ResNet-34 -> ResNet-18
(the reference batch, docs/design.md §3): the student update for plain KD and retention order
0/1/2, the authors' order-2 update through ``higher`` (``pip install -e .[bench]``), one generator
step, one full iteration, images/s and peak memory. Medians of interleaved rounds after warm-up;
ratios to plain KD on the same batch; device, threads and library versions in table and JSON.

    python -m bench                                # both pairs on this machine's default device
    python -m bench --threads 2 --batch resnet=64 --out bench.json
    python -m bench --device cuda --bf16           # then --no-channels-last: both memory formats
    python -m bench --quick --out /tmp/bench.json  # seconds: tiny batches, one round (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch

from bench.peak_memory import method as memory_method
from bench.suite import AUTHORS, PAIRS, UPDATES, Settings, authors_available, measure_pair
from lrra.config import LRRAConfig

# --quick: one call of each step without warm-up, tiny batches, 2 student steps per iteration,
# ResNets on 4x4 images (LeNet needs 32x32; BatchNorm needs a memory batch of 2 on ResNet's 1x1
# maps, so B=16): the whole suite in seconds, for a test. Its figures mean nothing.
QUICK_FIELDS = {"mnist": dict(batch_size=16, kd_steps=2), "resnet": dict(batch_size=16, kd_steps=2, image_size=8)}


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {"device": str(device), "device_name": name, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "memory_method": memory_method(device),
            "versions": {p: version(p) for p in ("torch", "torchvision", "higher")}}


def parse_batches(items: list[str], parser: argparse.ArgumentParser) -> dict[str, int]:
    batches = {}
    for item in items:
        pair, _, value = item.partition("=")
        if pair not in PAIRS or not value.isdigit() or int(value) < 1:
            parser.error(f"--batch {item!r}: expected PAIR=B with PAIR one of {sorted(PAIRS)} and B an integer >= 1")
        batches[pair] = int(value)
    return batches


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--batch", action="append", default=[], metavar="PAIR=B",
                        help="fresh batch of a pair (memory batch B/8); default: the preset's (mnist 128, resnet 512)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; the median is kept")
    parser.add_argument("--reps", type=int, default=2, help="calls per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each step first")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast, as --set bf16=true")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=LRRAConfig.channels_last,
                        help="channels-last tensors (a run's default); --no-channels-last as --set channels_last=false")
    parser.add_argument("--quick", action="store_true", help="seconds: tiny batches, 2 student steps, one round")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        parser.error(f"--device {args.device!r}: allowed cpu, cuda, cuda:N")
    for name in ("rounds", "reps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    args.batch = parse_batches(args.batch, parser)
    return args


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_pair(name: str, r: dict) -> None:
    size = f"{r['image_size']}x{r['image_size']}"
    print(f"\n{name}: {r['teacher']} -> {r['student']}, {size}, B={r['batch']} fresh + {r['memory_batch']} memory "
          f"(preset batch {r['preset_batch']}), {r['gen_steps']} generator + {r['kd_steps']} student steps/iteration")
    print(f"  {'step':<16} {'ms':>10} {'x plain KD':>11} {'peak MiB':>9}")
    for step, ms in r["ms"].items():
        ratio = r["ratio_to_plain_kd"].get(step)
        print(f"  {step:<16} {ms:10.1f} {fmt(ratio, '11.2f'):>11} {fmt(r['peak_mib'][step], '9.1f'):>9}")
    print(f"  images/s {r['images_per_s']:.1f}; the preset's schedule projected at {r['projected_schedule_h']:.2f} h")
    if "order2_over_authors" in r:
        print(f"  ours / authors' (order 2, same batch): {r['order2_over_authors']:.3f}x")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {name: {} for name in args.pairs}
    if args.quick:
        args.rounds, args.reps, args.warmup = 1, 1, 0
        fields = {name: dict(QUICK_FIELDS[name]) for name in args.pairs}
    for name, batch in args.batch.items():
        fields.setdefault(name, {})["batch_size"] = batch
    device = torch.device(args.device)
    settings = Settings(device, args.rounds, args.reps, args.warmup, args.bf16, args.channels_last)
    env = environment(device)
    layout = f"{'channels-last' if args.channels_last else 'NCHW'}{', bf16 autocast' if args.bf16 else ''}"
    print(f"device {env['device_name']} ({env['device']}), torch threads {env['torch_threads']}, {layout}, "
          f"{', '.join(f'{k} {v}' for k, v in env['versions'].items())}; peak memory: {env['memory_method']}")
    if not authors_available():
        print("authors' baseline skipped: `higher` is not installed (pip install -e .[bench])", file=sys.stderr)
    results = {name: measure_pair(name, settings, **fields[name]) for name in args.pairs}
    for name, r in results.items():
        print_pair(name, r)
    report = {**env, "quick": args.quick, "rounds": args.rounds, "reps": args.reps, "warmup": args.warmup,
              "bf16": args.bf16, "channels_last": args.channels_last, "steps": list(UPDATES) + [AUTHORS],
              "pairs": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
