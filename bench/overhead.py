"""What a search adds to a run: one trial of ``tune/search.py`` vs the bare ``python -m lrra distill``.

Both run the same configuration (the preset's own, which is a search's first trial) with the same
teacher, one CPU thread (a Ray Train worker gets OMP_NUM_THREADS=1 per CPU) and MLflow logging
to a temporary store, as both log by default. The runs are
interleaved, bare then search, ``--repeats`` times, so that load from other work on a shared
machine hits both alike; the load average is recorded next to every run.

Two ratios, medians over the repeats:
- trial / bare: the search's trial from its start to its end (Ray Train worker startup, Tune
  reporting, checkpoints) over the whole bare command (Python startup included);
- search / bare: the whole search command (plus Ray's own startup and shutdown) over the same.

    python -m bench.overhead                       # mnist, 30 epochs: a trial of ~7 minutes
    python -m bench.overhead --epochs 3 --repeats 1
    python -m bench.overhead --smoke-test          # digits, seconds of work: Ray's startup dominates
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna

from bench.timing import timed
from lrra.config import preset
from lrra.teacher import obtain_teacher

ROOT = Path(__file__).resolve().parent.parent
THREADS = 1  # what a 1-CPU Ray Train worker gets


def run_timed(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, 1-minute load average at the end, stderr tail); raises if the command fails."""
    done, wall = timed(lambda: subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env))
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, os.getloadavg()[0], done.stderr


def bare_command(args, teacher: str, out: Path, tracking_uri: str) -> list[str]:
    return [sys.executable, "-m", "lrra", "distill", "--preset", args.preset, "--workers", "0",
            "--teacher", teacher, "--data-dir", args.data_dir, "--epochs", str(args.epochs), "--out", str(out),
            "--tracking-uri", tracking_uri]


def search_command(args, teacher: str, storage: Path, name: str, tracking_uri: str) -> list[str]:
    return [sys.executable, str(ROOT / "tune" / "search.py"), "--preset", args.preset, "--teacher", teacher,
            "--data-dir", args.data_dir, "--epochs", str(args.epochs), "--num-samples", "1", "--time-budget", "none",
            "--storage-path", str(storage), "--name", name, "--tracking-uri", tracking_uri]


def trial_wall_s(storage: Path, name: str) -> float:
    """The single trial's start-to-end time, as the search's Optuna study recorded it."""
    (trial,) = optuna.load_study(study_name=name, storage=f"sqlite:///{storage / 'optuna.db'}").trials
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mnist")
    parser.add_argument("--epochs", type=int, help="distillation epochs (default: the preset's)")
    parser.add_argument("--repeats", type=int, default=2, help="bare/search pairs, interleaved (default: 2)")
    parser.add_argument("--smoke-test", action="store_true", help="digits, 2 epochs, 1 repeat")
    args = parser.parse_args()
    if args.smoke_test:
        args.preset, args.epochs, args.repeats = "digits", args.epochs or 2, 1
    cfg = preset(args.preset, **({"epochs": args.epochs} if args.epochs else {}))
    args.epochs, args.data_dir = cfg.epochs, str(Path(cfg.data_dir).absolute())
    _, _, teacher_path = obtain_teacher(cfg)
    teacher = str(Path(teacher_path).absolute())
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONUNBUFFERED="1")

    runs = []
    with tempfile.TemporaryDirectory(prefix="lrra-overhead-") as tmp:
        work = Path(tmp)
        # Both log to MLflow, as they do by default, into a store of their own.
        tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
        for repeat in range(args.repeats):
            bare_s, bare_load, _ = run_timed(bare_command(args, teacher, work / f"bare-{repeat}", tracking_uri), env)
            print(f"repeat {repeat + 1}: bare   {bare_s:7.1f} s  (load {bare_load:.1f})", file=sys.stderr, flush=True)
            name = f"overhead-{repeat}"
            search = search_command(args, teacher, work / "search", name, tracking_uri)
            search_s, search_load, _ = run_timed(search, env)
            trial_s = trial_wall_s(work / "search", name)
            print(f"repeat {repeat + 1}: search {search_s:7.1f} s, its trial {trial_s:.1f} s  (load {search_load:.1f})",
                  file=sys.stderr, flush=True)
            runs.append({"bare_s": round(bare_s, 1), "search_s": round(search_s, 1), "trial_s": round(trial_s, 1),
                         "load_bare": round(bare_load, 2), "load_search": round(search_load, 2)})

    trial_ratio = statistics.median(r["trial_s"] / r["bare_s"] for r in runs)
    search_ratio = statistics.median(r["search_s"] / r["bare_s"] for r in runs)
    print(f"\n{args.preset}, {args.epochs} epochs, {THREADS} thread, {os.cpu_count()} CPUs, {args.repeats} repeat(s)")
    print(f"{'repeat':>6} {'bare s':>8} {'trial s':>8} {'search s':>9} {'load':>10}")
    for i, r in enumerate(runs, 1):
        print(f"{i:>6} {r['bare_s']:>8.1f} {r['trial_s']:>8.1f} {r['search_s']:>9.1f} "
              f"{r['load_bare']:>4.1f}/{r['load_search']:<4.1f}")
    print(f"trial / bare  {trial_ratio:.3f}x   (goal <= 1.15x)\nsearch / bare {search_ratio:.3f}x")
    print(json.dumps({"preset": args.preset, "epochs": args.epochs, "runs": runs,
                      "trial_over_bare": round(trial_ratio, 3), "search_over_bare": round(search_ratio, 3)}))


if __name__ == "__main__":
    main()
