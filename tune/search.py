"""Search the LRRA knobs with Ray Tune and Optuna: ``python tune/search.py [--preset mnist] [...]``.

Each trial trains the LRRA Distiller in its own process, or as a Ray Train run (tune/trial.py).
Optuna's seeded multivariate TPE proposes the next configuration and keeps every trial in a
persistent study (tune/study.py); ASHA stops weak trials after a few epochs of validation accuracy.
The preset's own configuration is always the first trial, its counterpart (tune/space.py) the
second, and on mnist the preset with its student's gradient clipped the third; ASHA never stops
these (tune/scheduler.py). With no flags: a local Ray, the cached (or a freshly trained) MNIST
teacher, and a search sized for ~10 minutes on two CPU cores.

Everything a search writes lives in STORAGE_PATH/NAME: search.json (its settings, for --resume),
Tune's experiment state, one run folder per trial under train/, and results.parquet (one row
per trial). The Optuna study is NAME in --study-storage (default STORAGE_PATH/optuna.db).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.fs
import ray
import ray.cloudpickle
from ray.tune import ExperimentAnalysis, RunConfig, TuneConfig, Tuner
from ray.tune.experiment import Trial

from lrra import logs, tracking
from lrra.cli import USER_ERRORS
from lrra.cli_args import add_subject_arguments, config_fields_help, flag_fields, set_fields
from lrra.config import ConfigError, LRRAConfig, preset
from lrra.metric_names import VALIDATION_METRIC
from lrra.preflight import check_address, check_storage
from lrra.runner import default_run_name
from lrra.teacher import prepare_teacher
from lrra.teacher_files import teacher_payload
from tune import cluster
from tune.cut_trials import keep_cut_students
from tune.plan import BUDGETS, CLUSTER_BUDGET, SMOKE_TEST, SearchPlan, filesystem, load_plan, save_plan
from tune.report import ProgressLines, print_summary, write_parquet
from tune.runtime import (
    add_resource_arguments,
    check_resource_arguments,
    cluster_tags,
    fit_resources,
    quiet_libraries,
    start_search_ray,
)
from tune.scheduler import BaselineSparingASHA, baseline_numbers
from tune.search_tracking import SEARCH_EXPERIMENT, SearchTracker, best_logged_student, run_status, tracked_search
from tune.space import (
    baseline_points,
    build_space,
    describe_space,
    excluded_by_bounds,
    parse_bounds,
    parse_point,
    read_space_file,
)
from tune.study import (
    EPOCHS_DONE,
    TIME_BUDGET,
    StudySearch,
    default_study_storage,
    finished_results,
    load_study,
    open_storage,
    record_best_student,
    settle_unfinished,
    trial_rows,
)
from tune.trial import TrialSetup, trainable, trains_in_process

logger = logs.search

DEFAULT_STORAGE = "runs/search"
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C: the search can be continued with --resume


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python tune/search.py", description=__doc__,
                                     epilog=config_fields_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to search")
    add_subject_arguments(what, preset_default=None, preset_help="default: mnist; digits with --smoke-test",
                          set_help="set a base config field; setting a searched knob fixes it",
                          teacher_help="teacher file (default: the cached one, trained first if missing)",
                          epochs_help="distillation epochs per trial (default: the preset's)")
    what.add_argument("--bound", action="append", default=[], metavar="KNOB=LOW:HIGH",
                      help="change a knob's range, or its choices with KNOB=A,B (repeatable)")
    what.add_argument("--space-file",
                      help='JSON object of bounds, e.g. {"meta_lr": "0.01:0.5", "retention_order": [0, 2]}')
    what.add_argument("--point", action="append", default=[], metavar="KNOB=VALUE,...",
                      help="a configuration to try early, after the preset's own and its counterparts; "
                           "other knobs keep the preset's values (repeatable)")

    budget = parser.add_argument_group("how much to search")
    mnist = BUDGETS["mnist"]
    budget.add_argument("--num-samples", type=int,
                        help=f"trials (default: {mnist.num_samples} for mnist, "
                             f"{CLUSTER_BUDGET.num_samples} for the ResNet presets)")
    budget.add_argument("--time-budget", metavar="DURATION",
                        help="stop the search after this long, e.g. 720, 12m, 1.5h, or none "
                             f"(default: {mnist.time_budget_s / 60:g}m for mnist, none for the ResNet presets)")
    budget.add_argument("--grace-period", type=int, help="epochs before ASHA may stop a trial (default: per preset)")
    budget.add_argument("--reduction-factor", type=float, default=3.0,
                        help="ASHA keeps the best 1/RF of the trials at each rung (default: 3)")
    budget.add_argument("--smoke-test", action="store_true",
                        help="3 trials of 3 short epochs on the digits preset: seconds of work per trial")

    where = parser.add_argument_group("where it runs and writes")
    where.add_argument("--address", help="Ray cluster to join, HOST:PORT or auto (default: start a local Ray)")
    add_resource_arguments(where)
    where.add_argument("--storage-path", default=DEFAULT_STORAGE,
                       help=f"experiments folder or URI, e.g. s3://bucket/runs (default: {DEFAULT_STORAGE})")
    where.add_argument("--name", help="experiment name (default: <preset>-<date>-<time>)")
    where.add_argument("--study-storage", metavar="URL",
                       help="Optuna storage, any SQLAlchemy URL (default: sqlite:///STORAGE_PATH/optuna.db)")
    where.add_argument("--tracking-uri", metavar="URI",
                       help="MLflow store: http://HOST:PORT for a tracking server, which a cluster's nodes need "
                            "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder); "
                            "--resume uses the search's own unless given one")
    where.add_argument("--resume", nargs="?", const="", metavar="NAME",
                       help="continue an interrupted search (default NAME: the latest one under --storage-path) "
                            "with its saved settings; finished trials are kept, unfinished ones continue")
    return parser


# ----------------------------------------------------------------------------------------
# Checks that need no Ray: they run first, in seconds.


def parse_duration(text: str | None) -> float | None:
    """'720', '720s', '12m', '1.5h' -> seconds; 'none' or '0' -> no budget."""
    if text is None or text.lower() in ("none", "0"):
        return None
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1].lower())
    try:
        seconds = float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        raise ConfigError(f"--time-budget {text}: expected seconds or a duration such as 12m or 1.5h") from None
    if seconds <= 0:
        raise ConfigError(f"--time-budget {text}: must be positive (or none)")
    return seconds


def check_positive(args: argparse.Namespace) -> None:
    for flag, value in (("--num-samples", args.num_samples), ("--epochs", args.epochs),
                        ("--grace-period", args.grace_period)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: must be >= 1")
    check_resource_arguments(args)
    if args.reduction_factor <= 1:
        raise ConfigError(f"--reduction-factor {args.reduction_factor}: must be > 1")


def new_plan(args: argparse.Namespace, storage_path: str) -> SearchPlan:
    """A fresh search's plan from the flags; every check that fails on bad input runs here."""
    check_positive(args)
    smoke = SMOKE_TEST if args.smoke_test else {}
    preset_name = args.preset or smoke.get("preset", "mnist")
    overrides = set_fields(args)
    fixed = set(overrides)  # before the flags below: only --set fixes a knob
    if smoke:
        overrides.setdefault("iters_per_epoch", str(smoke["iters_per_epoch"]))
        overrides["epochs"] = str(smoke["epochs"])
    overrides.update(flag_fields(args))
    # Resolved here, once: a trial runs in a Ray session folder that changes with every Ray start,
    # and MLflow refuses to change a logged param of the run that a resumed trial continues.
    cfg = preset(preset_name, **overrides).with_absolute_paths()

    budget = BUDGETS.get(preset_name, CLUSTER_BUDGET)
    bounds = read_space_file(args.space_file) if args.space_file else {}
    bounds.update(parse_bounds(args.bound))
    space = build_space(preset_name, bounds, fixed, cfg)
    points = baseline_points(space, cfg) + [parse_point(text, space, cfg) for text in args.point]
    note_excluded_preset(space, cfg)
    num_samples = args.num_samples or smoke.get("num_samples", budget.num_samples)
    if len(points) > num_samples:
        logger.info(f"note: --num-samples {num_samples} runs only the first {num_samples} of the {len(points)} points "
                    "to evaluate first (the preset's, its counterparts, then --point)")
        points = points[:num_samples]

    default_time_budget = smoke.get("time_budget_s", budget.time_budget_s)
    time_budget = parse_duration(args.time_budget) if args.time_budget else default_time_budget
    name = args.name or default_run_name(cfg)
    return SearchPlan(
        name=name, storage_path=storage_path, config=cfg.to_dict(), space=space, points_to_evaluate=points,
        num_samples=num_samples, time_budget_s=time_budget,
        grace_period=min(args.grace_period or budget.grace_period, cfg.epochs),
        reduction_factor=args.reduction_factor, workers_per_trial=args.workers_per_trial,
        cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
        driver_cpus=args.driver_cpus, study_storage=args.study_storage or default_study_storage(storage_path),
        concurrent_trials_limit=args.max_concurrent_trials, created=time.strftime("%Y-%m-%d %H:%M:%S"))


def note_excluded_preset(space, cfg: LRRAConfig) -> None:
    """One line when the bounds leave out the preset's own configuration, otherwise the first trial."""
    excluded = excluded_by_bounds(space, cfg)
    if excluded:
        knobs = ", ".join(f"{name}={value} outside {space[name].describe()}" for name, value in excluded.items())
        logger.info(f"note: the bounds exclude the preset's own configuration ({knobs}): "
                    "its trial and its counterparts are not run")


def resumed_plan(args: argparse.Namespace, storage_path: str) -> SearchPlan:
    plan = load_plan(storage_path, args.resume or None)
    shaping = {"--preset": args.preset, "--teacher": args.teacher, "--data-dir": args.data_dir,
               "--epochs": args.epochs, "--set": args.overrides, "--bound": args.bound,
               "--space-file": args.space_file, "--point": args.point, "--num-samples": args.num_samples,
               "--time-budget": args.time_budget, "--grace-period": args.grace_period,
               "--smoke-test": args.smoke_test, "--name": args.name, "--study-storage": args.study_storage}
    ignored = [flag for flag, value in shaping.items() if value]
    if ignored:
        logger.info(f"note: --resume continues {plan.name} with its saved settings; ignoring {', '.join(ignored)}")
    return plan


def new_tuner(plan: SearchPlan, setup: TrialSetup, storage) -> Tuner:
    cfg = plan.cfg
    searcher = StudySearch(plan.space, storage=storage, study_name=plan.study_name, seed=cfg.seed,
                           epochs=cfg.epochs, points_to_evaluate=plan.points_to_evaluate,
                           n_startup_trials=max(1, min(10, plan.num_samples // 2)),
                           attributes={"mlflow_experiment": SEARCH_EXPERIMENT, "mlflow_tracking_uri": plan.tracking_uri,
                                       "search_folder": plan.experiment_path, "teacher": cfg.teacher_path,
                                       "dataset": cfg.dataset, "preset": cfg.preset})
    # stop_last_trials=False: a trial that reaches its last epoch ends by itself, after its Ray Train
    # run has finished and released its workers, instead of being cut while its run writes the best
    # student. reuse_actors=False: a stopped trial's process ends, and its Ray Train run with it,
    # rather than training on in the background while the next trial waits for its workers' CPUs.
    # ASHA never stops the baseline trials (the preset, its counterparts; tune/scheduler.py).
    spared = baseline_numbers(min(len(baseline_points(plan.space, cfg)), len(plan.points_to_evaluate)))
    scheduler = BaselineSparingASHA(spared=spared, time_attr=EPOCHS_DONE, metric=VALIDATION_METRIC, mode="max",
                                    max_t=cfg.epochs, grace_period=plan.grace_period,
                                    reduction_factor=plan.reduction_factor, stop_last_trials=False)
    return Tuner(
        trainable(setup, plan.driver_cpus),
        tune_config=TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=plan.num_samples,
                               max_concurrent_trials=plan.max_concurrent_trials, time_budget_s=plan.time_budget_s,
                               reuse_actors=False),
        run_config=RunConfig(name=plan.name, storage_path=plan.storage_path, verbose=0,
                             callbacks=[ProgressLines(cfg.epochs, plan.num_samples, plan.name,
                                                      time_budget_s=plan.time_budget_s)]))


def tune_trials(experiment_path: str) -> dict[str, str]:
    """Tune trial id -> status, from Tune's last saved experiment state."""
    return {t.trial_id: t.status for t in ExperimentAnalysis(experiment_path).trials}


def unfinished(trials: dict[str, str]) -> set[str]:
    """The Tune trial ids of ``tune_trials`` that a --resume would continue."""
    return {trial_id for trial_id, status in trials.items() if status not in (Trial.TERMINATED, Trial.ERROR)}


def trial_outcomes(rows: list[dict]) -> dict[str, tuple[str, str]]:
    """Tune trial id -> (MLflow run status, stop reason), for SearchTracker.finish."""
    return {row["tune_trial_id"]: (run_status(row["stop_reason"]), row["stop_reason"])
            for row in rows if row["tune_trial_id"]}


def search_params(plan: SearchPlan, teacher_meta: dict) -> dict:
    """The parent run's params: what the search fixed when it started (the same on --resume)."""
    cfg = plan.cfg
    # The teacher as read (a user's file says its own architecture and format), not the preset's default.
    return {"preset": cfg.preset, "dataset": cfg.dataset, "teacher_arch": teacher_meta.get("arch", cfg.teacher_arch),
            "teacher.format": teacher_meta.get("format", "lrra"),
            "student_arch": cfg.student_arch, "epochs": cfg.epochs, "teacher.path": cfg.teacher_path,
            "teacher.test_accuracy": teacher_meta["test_accuracy"], "num_samples": plan.num_samples,
            "time_budget_s": plan.time_budget_s, "grace_period": plan.grace_period,
            "reduction_factor": plan.reduction_factor, "workers_per_trial": plan.workers_per_trial,
            "cpus_per_worker": plan.cpus_per_worker, "gpus_per_worker": plan.gpus_per_worker,
            "max_concurrent_trials": plan.max_concurrent_trials, "study": f"{plan.study_storage}#{plan.study_name}",
            **{f"space.{name}": knob.describe() for name, knob in plan.space.items()}}


def has_tune_state(experiment_path: str) -> bool:
    """Whether Tune saved its experiment state (trials, searcher) there: Tune writes the tuner's own
    file before it, so Tuner.can_restore alone says yes to a search killed in between."""
    fs, path = filesystem(experiment_path)
    files = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return Tuner.can_restore(experiment_path) and any(
        info.base_name.startswith("experiment_state-") for info in files)


def resumed_tuner(plan: SearchPlan, setup: TrialSetup, storage) -> Tuner:
    """Tune's saved search, whose trials the study already finished only report their stored result.

    Tune saves its state every ~10 s: after a killed driver, a trial it still calls unfinished may
    be finished in the study (tune/study.py), and must not run again.
    """
    if not has_tune_state(plan.experiment_path):
        # Killed before Tune saved anything: nothing ran to its end yet, so start over; the
        # study keeps the trials already asked, and StudySearch takes them over.
        logger.info(f"note: {plan.experiment_path} holds no Tune state yet (the search stopped while starting); "
                    "starting it over with its saved settings")
        return new_tuner(plan, setup, storage)
    setup = dataclasses.replace(setup, finished=finished_results(load_study(plan.study_storage, plan.study_name)))
    return Tuner.restore(plan.experiment_path, trainable=trainable(setup, plan.driver_cpus),
                         resume_unfinished=True, resume_errored=False)


def run_search(plan: SearchPlan, setup: TrialSetup, storage, resume: bool, tracker: SearchTracker) -> int:
    study_args = (plan.study_storage, plan.study_name)
    tuner = resumed_tuner(plan, setup, storage) if resume else new_tuner(plan, setup, storage)

    start = time.monotonic()
    tuner.fit()
    wall_s = time.monotonic() - start

    study = load_study(*study_args)
    known = tune_trials(plan.experiment_path)
    resumable = unfinished(known)  # empty unless the search was interrupted
    settle_unfinished(study, storage, resumable, set(known), TIME_BUDGET)
    rows = trial_rows(study, list(plan.space), plan.train_path)
    keep_cut_students(tracker.client, tracker.run_id, rows, plan.cfg, list(plan.space), setup.teacher_payload,
                      setup.teacher_meta)
    write_parquet(rows, plan.results_path)
    best_student = best_logged_student(tracker.client, tracker.run_id)
    print_summary(rows, plan, wall_s, runs_view=tracker.runs_view(), best_student=best_student)
    if best_student is not None:
        record_best_student(study, rows, best_student.trial_id)
    champion = tracker.finish(study, pd.DataFrame(rows), trial_outcomes(rows), plan.cfg,
                              interrupted=bool(resumable), best_student=best_student)
    if champion is not None:
        logger.info(f"MLflow: registered {champion['name']} version {champion['version']}"
                    + (" as the new champion" if champion["champion"] else "; the champion stays"))
    if resumable:
        logger.info(f"\ninterrupted with {len(resumable)} trial(s) unfinished; continue with:\n"
                    f"  python tune/search.py --resume {plan.name} --storage-path {plan.storage_path}")
        return EXIT_INTERRUPTED
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    resume = args.resume is not None
    try:
        target = cluster.prepare(args, argv, build_parser)  # which Ray; a cluster's settings as defaults
        if args.address:
            check_address(args.address)  # seconds, not ray.init's minutes of retries
        storage_path = check_storage(args.storage_path)
        plan = resumed_plan(args, storage_path) if resume else new_plan(args, storage_path)
        # A resumed search logs where it started unless told otherwise (a server that moved).
        plan.tracking_uri = tracking.resolve_tracking_uri(args.tracking_uri or plan.tracking_uri or None)
        tracking_uri = plan.tracking_uri
        tracking.check_tracking_uri(tracking_uri)
        cfg = plan.cfg
        # Before anything is written: a teacher that does not fit or scores near chance fails now. Trains
        # and caches a teacher if none is given; fails early without the data.
        teacher, teacher_meta, teacher_path, splits = prepare_teacher(cfg)
        storage = open_storage(plan.study_storage)
        plan.config["teacher_path"] = str(Path(teacher_path).absolute())  # a resume uses this very teacher
        start_search_ray(target)
    except USER_ERRORS as err:
        logger.error(f"error: {err}")
        return 2

    try:
        if not resume:
            plan = fit_resources(plan, target.capacity)
            save_plan(plan)
        logger.info(f"search {plan.name}: {plan.num_samples} trial(s) of {cfg.epochs} epochs on {cfg.preset}, "
                    f"{plan.max_concurrent_trials} at a time, {plan.workers_per_trial} worker(s) each "
                    f"({plan.cpus_per_worker:g} CPU(s), {plan.gpus_per_worker:g} GPU(s) per worker); "
                    f"time budget {f'{plan.time_budget_s / 60:g} min' if plan.time_budget_s else 'none'}; "
                    f"teacher {teacher_path} (validation acc {teacher_meta['val_accuracy']:.4f})\n{splits.describe()}; "
                    f"every choice reads validation\nknobs:\n{describe_space(plan.space)}")
        with tracked_search(tracking_uri, plan.experiment_path, search_params(plan, teacher_meta),
                            resume=resume, run_name=plan.name, tags=cluster_tags()) as tracker:
            setup = TrialSetup(config=plan.config, teacher_payload=teacher_payload(teacher, teacher_meta, teacher_path),
                               teacher_meta=teacher_meta,
                               workers=plan.workers_per_trial, cpus_per_worker=plan.cpus_per_worker,
                               gpus_per_worker=plan.gpus_per_worker, train_path=plan.train_path,
                               tracking=tracker.trial_target, max_failures=cluster.trial_max_failures(target),
                               search_name=plan.name,
                               in_process=trains_in_process(plan.workers_per_trial, target.is_cluster))
            return run_search(plan, setup, storage, resume, tracker)
    except USER_ERRORS as err:
        logger.error(f"error: {err}")
        return 2
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
