"""The GPU check: one command for the few minutes a GPU is lent, one JSON file, one table.

    python -m bench.gpu                          # writes gpu-check.json
    python -m bench.gpu --out /tmp/gpu.json --skip-bench

It runs, in order, each part in its own process with its own time limit:
1. the tests marked ``gpu`` (tests/test_gpu.py): the order-1/2 meta-gradient on CUDA against the
   float64 CPU reference, one iteration of every preset at its own shapes, bf16 and channels-last
   steps, a one-worker Ray Train run over NCCL;
2. ``python -m bench --device cuda`` on both model pairs at their presets' batches (MNIST 128 + 16;
   ResNet-34 -> ResNet-18 at the reference 512 + 64), channels-last, then the same in bf16;
3. the goals read off (2): the order-2 update at most GOAL_ORDER2_OVER_KD x plain KD at B=512, and
   the 400-epoch CIFAR-100 reference schedule projected under GOAL_SCHEDULE_H hours.

Without CUDA every part is skipped and says so (the tests skip themselves), and the command exits 0:
CI and CPU machines run it that way. It exits 1 if anything failed or a goal was missed. Sized
for about 5 minutes on one H100; the limits below stop a part that hangs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GOAL_ORDER2_OVER_KD = 2.5
GOAL_SCHEDULE_H = 4.0
TESTS_TIMEOUT_S = 240
BENCH_TIMEOUT_S = 180
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


def run_tests(timeout_s: int) -> dict:
    """pytest -m gpu, read back from its JUnit XML: one entry per test with its outcome and seconds."""
    with tempfile.TemporaryDirectory() as folder:
        xml = Path(folder) / "gpu-tests.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", f"--junitxml={xml}",
                   "-p", "no:cacheprovider"]
        started = time.monotonic()
        try:
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": FAILED, "reason": f"the GPU tests ran past {timeout_s} s", "tests": []}
        tests = [test_outcome(case) for case in ElementTree.parse(xml).iter("testcase")] if xml.exists() else []
    failed = done.returncode not in (0, 5) or any(t["status"] == FAILED for t in tests)
    everything_skipped = bool(tests) and all(t["status"] == SKIPPED for t in tests)
    return {"status": FAILED if failed else SKIPPED if everything_skipped else PASSED,
            "seconds": round(time.monotonic() - started, 1), "tests": tests,
            **({"output_tail": done.stdout[-4000:] + done.stderr[-2000:]} if failed else {})}


def test_outcome(case: ElementTree.Element) -> dict:
    name = f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}"
    status = (FAILED if case.find("failure") is not None or case.find("error") is not None
              else SKIPPED if case.find("skipped") is not None else PASSED)
    return {"test": name, "status": status, "seconds": float(case.get("time", 0))}


def run_bench(extra: list[str], timeout_s: int) -> dict:
    """``python -m bench --device cuda`` on both pairs; its JSON, or why there is none."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "bench.json"
        command = [sys.executable, "-m", "bench", "--device", "cuda", "--out", str(out), *extra]
        try:
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": FAILED, "reason": f"python -m bench {' '.join(extra)} ran past {timeout_s} s"}
        if done.returncode != 0 or not out.exists():
            return {"status": FAILED, "reason": f"exit {done.returncode}", "output_tail": done.stderr[-3000:]}
        return {"status": PASSED, **json.loads(out.read_text())}


def goals(bench: dict) -> list[dict]:
    """The recorded GPU goals, checked against the channels-last float32 run of the ResNet pair."""
    if bench.get("status") != PASSED:
        return [{"goal": "ResNet pair measured", "status": SKIPPED if bench.get("status") == SKIPPED else FAILED}]
    resnet = bench["pairs"]["resnet"]
    ratio, hours = resnet["ratio_to_plain_kd"]["order2"], resnet["projected_schedule_h"]
    return [
        {"goal": f"order-2 update <= {GOAL_ORDER2_OVER_KD}x plain KD at B={resnet['batch']}", "value": ratio,
         "status": PASSED if ratio <= GOAL_ORDER2_OVER_KD else FAILED},
        {"goal": f"400-epoch CIFAR-100 reference projected < {GOAL_SCHEDULE_H} h", "value": hours,
         "status": PASSED if hours < GOAL_SCHEDULE_H else FAILED},
    ]


def print_table(report: dict) -> None:
    print(f"\nGPU check on {report['device_name']}: {report['verdict']}")
    tests = report["tests"]
    print(f"  tests marked gpu: {tests['status']}" + (f" in {tests['seconds']} s" if "seconds" in tests else ""))
    for test in tests["tests"]:
        print(f"    {test['status']:<8} {test['seconds']:7.1f} s  {test['test']}")
    for label, bench in report["bench"].items():
        print(f"  python -m bench ({label}): {bench['status']}" + (f": {bench['reason']}" if "reason" in bench else ""))
        for pair, r in bench.get("pairs", {}).items():
            ratios = ", ".join(f"{step} {value:.2f}x" for step, value in r["ratio_to_plain_kd"].items()
                               if value is not None)
            print(f"    {pair:<7} B={r['batch']}+{r['memory_batch']}: plain KD {r['ms']['plain_kd']:.1f} ms; {ratios}; "
                  f"{r['images_per_s']:.0f} images/s; preset schedule {r['projected_schedule_h']:.2f} h")
    for goal in report["goals"]:
        value = f" ({goal['value']:.2f})" if "value" in goal else ""
        print(f"  goal: {goal['goal']}{value}: {goal['status']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="where the JSON goes")
    parser.add_argument("--skip-bench", action="store_true", help="only the tests marked gpu")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    report = {"device_name": torch.cuda.get_device_name(0) if cuda else "no CUDA device (skip mode)",
              "torch": torch.__version__, "cuda": torch.version.cuda, "tests": run_tests(TESTS_TIMEOUT_S)}
    no_gpu = {"status": SKIPPED, "reason": "no CUDA device" if not cuda else "--skip-bench"}
    run = cuda and not args.skip_bench
    report["bench"] = {"float32": run_bench([], BENCH_TIMEOUT_S) if run else no_gpu,
                       "bf16": run_bench(["--bf16", "--rounds", "3"], BENCH_TIMEOUT_S) if run else no_gpu}
    report["goals"] = goals(report["bench"]["float32"])
    outcomes = [report["tests"]["status"], *(b["status"] for b in report["bench"].values()),
                *(g["status"] for g in report["goals"])]
    report["verdict"] = FAILED if FAILED in outcomes else PASSED if PASSED in outcomes else SKIPPED
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {args.out}")
    return 1 if report["verdict"] == FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
