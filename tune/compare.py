"""Does retention help? ``python tune/compare.py``: variants x seeds as parallel Ray Tune trials.

By default four variants of the preset (retention order 2, order 1, replay only, no memory) run
with seeds 0, 1 and 2, one Ray Train run per (variant, seed), on whatever Ray cluster is there
(tune/cluster.py's rules, as the search). ``--from-search NAME --top-k K`` compares the K best
configurations of a finished search instead, ``--variant NAME:FIELD=VALUE,...`` adds one's own.

It reports per variant the mean and spread over seeds of the final, best and mean-over-epochs
validation accuracy, the test accuracy of the chosen student, a forgetting measure and the wall
time, and which differences to a reference variant (default: no-memory) exceed the seed spread by
a paired t-test over seeds (tune/compare_stats.py defines each number). It writes to
STORAGE_PATH/NAME: trials.parquet (one row per trial, with its accuracy curve), summary.parquet
(one row per variant), curves.png and table.txt, all also logged to one MLflow parent run
(experiment lrra-compare) whose child runs are the trials.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.cloudpickle
import ray.tune
from ray.tune import ResultGrid, RunConfig, TuneConfig, Tuner
from ray.tune.search.basic_variant import BasicVariantGenerator

from lrra import logs, tracking
from lrra.cli import USER_ERRORS
from lrra.cli_args import add_subject_arguments, config_fields_help, flag_fields, set_fields
from lrra.config import ConfigError, LRRAConfig, preset
from lrra.metric_names import DIVERGED_KEY, TEST_METRIC, VALIDATION_METRIC
from lrra.preflight import check_address, check_storage
from lrra.runner import default_run_name
from lrra.teacher import prepare_teacher
from lrra.teacher_files import teacher_payload
from lrra.tracking import RunTarget
from tune import cluster
from tune.compare_report import format_table, log_comparison, open_comparison_run, plot_curves
from tune.compare_stats import TEST_NAME, summarise, trial_metrics
from tune.compare_variants import (
    BUILT_IN,
    DEFAULT_REFERENCE,
    Variant,
    built_in,
    parse_seeds,
    parse_variant,
    top_configurations,
    trial_points,
)
from tune.plan import SearchPlan, filesystem
from tune.report import ProgressLines, config_key, write_parquet
from tune.runtime import (
    add_resource_arguments,
    check_resource_arguments,
    cluster_tags,
    fit_resources,
    quiet_libraries,
    start_search_ray,
)
from tune.search_tracking import end_trial_runs, run_status
from tune.study import COMPLETED, DIVERGED, ERROR
from tune.trial import TrialSetup, trainable, trains_in_process

logger = logs.compare

DEFAULT_STORAGE = "runs/compare"
DEFAULT_SEARCH_STORAGE = "runs/search"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python tune/compare.py", description=__doc__,
                                     epilog=config_fields_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to compare")
    add_subject_arguments(what, preset_default=None, preset_help="default: mnist",
                          set_help="set a field of the base config every variant starts from",
                          teacher_help="teacher file (default: the cached one, trained first if missing)",
                          epochs_help="distillation epochs per trial (default: the preset's)")
    what.add_argument("--variants", help=f"built-in variants, comma-separated, from {list(BUILT_IN)} (default: "
                                         "all of them, unless --variant or --from-search is given)")
    what.add_argument("--variant", action="append", default=[], metavar="NAME:FIELD=VALUE,...",
                      help="a variant of one's own, e.g. tuned:retention_weight=0.1,retention_warmup_epochs=3")
    what.add_argument("--from-search", metavar="NAME",
                      help="compare the --top-k best completed trials of this finished search, on its base config")
    what.add_argument("--search-storage", default=DEFAULT_SEARCH_STORAGE,
                      help=f"where --from-search finds that search (default: {DEFAULT_SEARCH_STORAGE})")
    what.add_argument("--top-k", type=int, default=3, help="configurations taken from --from-search (default: 3)")
    what.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated; each variant runs once per seed "
                                                      "(default: 0,1,2)")
    what.add_argument("--reference", help=f"the variant the others are tested against (default: "
                                          f"{DEFAULT_REFERENCE} when compared, else the first)")

    where = parser.add_argument_group("where it runs and writes")
    where.add_argument("--address", help="Ray cluster to join, HOST:PORT or auto (default: tune/cluster.py's rules)")
    add_resource_arguments(where)
    where.add_argument("--storage-path", default=DEFAULT_STORAGE,
                       help=f"experiments folder or URI (default: {DEFAULT_STORAGE})")
    where.add_argument("--name", help="comparison name (default: <preset>-<date>-<time>-<random>)")
    where.add_argument("--tracking-uri", metavar="URI",
                       help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder)")
    # tune/cluster.py reads these search options; a comparison is never resumed nor a smoke test.
    parser.set_defaults(resume=None, smoke_test=False)
    return parser


# ----------------------------------------------------------------------------------------
# Checks that need no Ray: they run first, in seconds.


def choose_variants(args: argparse.Namespace) -> tuple[LRRAConfig, list[Variant], str | None]:
    """The base config, the variants and, with --from-search, the search's name for the record."""
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs {args.epochs}: must be >= 1")
    overrides = {**set_fields(args), **flag_fields(args)}
    variants: list[Variant] = []
    if args.from_search:
        plan, variants = top_configurations(args.search_storage, args.from_search, args.top_k)
        if args.preset:
            logger.info(f"note: --from-search {args.from_search} compares on that search's base config; "
                        "ignoring --preset")
        base = plan.cfg.replace(**overrides)
    else:
        base = preset(args.preset or "mnist", **overrides)
    if args.variants or not (args.variant or args.from_search):
        variants = built_in(args.variants or ",".join(BUILT_IN)) + variants
    variants += [parse_variant(text) for text in args.variant]
    return base.with_absolute_paths(), variants, args.from_search


def choose_reference(requested: str | None, variants: list[Variant]) -> str:
    names = [variant.name for variant in variants]
    if requested is not None:
        if requested not in names:
            raise ConfigError(f"--reference {requested}: not among the variants {names}")
        return requested
    return DEFAULT_REFERENCE if DEFAULT_REFERENCE in names else names[0]


def comparison_plan(args: argparse.Namespace, base: LRRAConfig, points: list[dict], storage_path: str) -> SearchPlan:
    """A comparison is planned as a search without a searcher: every point runs once, to its last epoch."""
    return SearchPlan(
        name=args.name or default_run_name(base), storage_path=storage_path, config=base.to_dict(), space={},
        points_to_evaluate=points, num_samples=len(points), time_budget_s=None, grace_period=base.epochs,
        reduction_factor=1.0, workers_per_trial=args.workers_per_trial, cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker, driver_cpus=args.driver_cpus, study_storage="",
        concurrent_trials_limit=args.max_concurrent_trials)


# ----------------------------------------------------------------------------------------
# Ray side.


Label = tuple[str, int]
"""A trial's (variant, seed)."""


def labels_by_config(points: list[dict], labels: list[Label]) -> dict[str, Label]:
    """Each point's (variant, seed), keyed by its configuration: how a Tune result finds its label."""
    return {config_key(point): label for point, label in zip(points, labels, strict=True)}


def run_trials(plan: SearchPlan, setup: TrialSetup, label_of: dict[str, Label]) -> ResultGrid:
    """Every point once, as many at a time as the cluster's free resources allow; progress lines
    name each trial by its variant and seed."""
    points = plan.points_to_evaluate
    names = {key: f"{name}/seed {seed}" for key, (name, seed) in label_of.items()}
    # The points are the whole plan; the space only names their keys (each point's values are in it).
    space = {key: ray.tune.choice(list(dict.fromkeys(point[key] for point in points))) for key in points[0]}
    tuner = Tuner(
        trainable(setup, plan.driver_cpus), param_space=space,
        tune_config=TuneConfig(search_alg=BasicVariantGenerator(points_to_evaluate=points,
                                                                max_concurrent=plan.max_concurrent_trials),
                               num_samples=plan.num_samples, reuse_actors=False),
        run_config=RunConfig(name=plan.name, storage_path=plan.storage_path, verbose=0,
                             callbacks=[ProgressLines(plan.cfg.epochs, plan.num_samples, trial_names=names)]))
    return tuner.fit()


def trial_rows(grid: ResultGrid, label_of: dict[str, Label]) -> list[dict[str, Any]]:
    """One row per trial, in the order of the points (``label_of``'s): its variant and seed, its
    accuracy curve and tune/compare_stats.py's numbers."""
    order = list(label_of.values())
    rows = []
    for result in grid:
        name, seed = label_of[config_key(result.config)]
        history = result.metrics_dataframe
        last = result.metrics or {}
        accs: list[float] = []
        if history is not None and VALIDATION_METRIC in history:
            # One value per epoch: a restarted worker group may report an epoch again.
            per_epoch = history.dropna(subset=[VALIDATION_METRIC]).drop_duplicates("epoch", keep="last")
            accs = [float(v) for v in per_epoch.sort_values("epoch")[VALIDATION_METRIC]]
        status = ERROR if result.error is not None else DIVERGED if last.get(DIVERGED_KEY) else COMPLETED
        rows.append({"variant": name, "seed": seed, "status": status, "tune_trial_id": last.get("trial_id"),
                     "epochs": len(accs), "val_accs": accs, **trial_metrics(accs),
                     "test_acc": last.get(TEST_METRIC) if status == COMPLETED else None,
                     "wall_s": last.get("time_total_s")})
    return sorted(rows, key=lambda row: order.index((row["variant"], row["seed"])))




def write_outputs(plan: SearchPlan, rows: list[dict], summary: list[dict], table: str, variants: list[str],
                  folder: Path) -> list[Path]:
    """trials.parquet, summary.parquet, curves.png and table.txt in ``folder`` (then logged to MLflow),
    copied to the comparison's folder under the storage path (local or a URI)."""
    files = [folder / "trials.parquet", folder / "summary.parquet", folder / "curves.png", folder / "table.txt"]
    write_parquet(rows, str(files[0]))
    write_parquet(summary, str(files[1]))
    plot_curves(rows, variants, files[2], f"{plan.name}: validation accuracy over {plan.cfg.epochs} epochs")
    files[3].write_text(table + "\n")
    fs, target = filesystem(plan.experiment_path)
    fs.create_dir(target, recursive=True)
    for path in files:
        pyarrow.fs.copy_files(str(path), f"{target}/{path.name}", source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)
    return files


def run_comparison(plan: SearchPlan, setup: TrialSetup, labels: list[Label], reference: str,
                   client, parent_run_id: str) -> int:
    label_of = labels_by_config(plan.points_to_evaluate, labels)
    grid = run_trials(plan, setup, label_of)
    rows = trial_rows(grid, label_of)
    variants = list(dict.fromkeys(name for name, _ in labels))
    summary = summarise(rows, variants, reference)
    end_trial_runs(client, parent_run_id, {row["tune_trial_id"]: (run_status(row["status"]), row["status"])
                                           for row in rows if row["tune_trial_id"]})
    table = format_table(summary, reference)
    with tempfile.TemporaryDirectory() as folder:
        files = write_outputs(plan, rows, summary, table, variants, Path(folder))
        log_comparison(client, parent_run_id, rows, summary, files)
    failed = [f"{row['variant']} seed {row['seed']} ({row['status']})" for row in rows if row["status"] != COMPLETED]
    print(f"\ncomparison {plan.name}: {len(variants)} variant(s) x {len(rows) // max(len(variants), 1)} seed(s), "
          f"{plan.cfg.epochs} epochs on {plan.cfg.subject}\n\n{table}\n\n"
          f"  not completed           {', '.join(failed) or 'none'}\n"
          f"  results                 {plan.experiment_path}/trials.parquet, summary.parquet, curves.png\n"
          f"  MLflow parent run       {parent_run_id} (experiment lrra-compare)", flush=True)
    return 1 if any(row["status"] == ERROR for row in rows) else 0


# ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 1 some trial raised (the others are reported); 2 bad input, before Ray starts."""
    args = build_parser().parse_args(argv)
    quiet_libraries()
    started_ray = not ray.is_initialized()  # a caller's Ray (tests share one) is used and left running
    try:
        target = cluster.prepare(args, argv, build_parser)
        if args.address:
            check_address(args.address)
        check_resource_arguments(args)
        seeds = parse_seeds(args.seeds)
        base, variants, search_name = choose_variants(args)
        reference = choose_reference(args.reference, variants)
        points = trial_points(base, variants, seeds)
        labels = [(variant.name, seed) for variant in variants for seed in seeds]
        plan = comparison_plan(args, base, points, check_storage(args.storage_path))
        tracking_uri = tracking.resolve_tracking_uri(args.tracking_uri)
        tracking.check_tracking_uri(tracking_uri)
        teacher, teacher_meta, teacher_path, splits = prepare_teacher(base)
        plan.config["teacher_path"] = str(Path(teacher_path).absolute())
        if started_ray:
            start_search_ray(target)
    except USER_ERRORS as err:
        logger.error(f"error: {err}")
        return 2

    try:
        plan = fit_resources(plan, target.capacity)
        logger.info(f"comparison {plan.name}: {len(variants)} variant(s) x {len(seeds)} seed(s) {seeds} = "
                    f"{len(points)} trial(s) of {base.epochs} epochs on {base.subject}, {plan.max_concurrent_trials} "
                    f"at a time; reference {reference}; {TEST_NAME}\n{splits.describe()}\nvariants:\n"
                    + "\n".join(f"  {v.name:<14} {', '.join(f'{k}={val}' for k, val in v.changes.items())}"
                                for v in variants))
        client = tracking.connect(tracking_uri)
        params = {"preset": base.preset, "epochs": base.epochs, "seeds": ",".join(map(str, seeds)),
                  "reference": reference, "test": TEST_NAME, "from_search": search_name or "",
                  "teacher.path": plan.config["teacher_path"], "teacher.test_accuracy": teacher_meta["test_accuracy"],
                  "storage": plan.experiment_path,
                  **{f"variant.{v.name}": ", ".join(f"{k}={val}" for k, val in v.changes.items()) for v in variants}}
        parent_run_id = open_comparison_run(client, plan.name, params)
        for key, value in cluster_tags().items():
            client.set_tag(parent_run_id, key, value)
        setup = TrialSetup(config=plan.config, teacher_payload=teacher_payload(teacher, teacher_meta, teacher_path),
                           teacher_meta=teacher_meta,
                           workers=plan.workers_per_trial, cpus_per_worker=plan.cpus_per_worker,
                           gpus_per_worker=plan.gpus_per_worker, train_path=plan.train_path,
                           tracking=RunTarget(tracking_uri, parent_run_id=parent_run_id),
                           max_failures=cluster.trial_max_failures(target),
                           in_process=trains_in_process(plan.workers_per_trial, target.is_cluster))
        with tracking.ended_run(client, parent_run_id):
            return run_comparison(plan, setup, labels, reference, client, parent_run_id)
    except USER_ERRORS as err:
        logger.error(f"error: {err}")
        return 2
    finally:
        if started_ray:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
