"""tune/compare.py: the seeded comparison's numbers, its input checks, and a real run on digits."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from mlflow import MlflowClient
from scipy import stats

from lrra import tracking
from lrra.config import ConfigError, preset
from tune import compare
from tune.compare_report import TAG_SEED, TAG_VARIANT
from tune.compare_stats import paired_difference, summarise, trial_metrics
from tune.compare_variants import Variant, parse_variant, trial_points
from tune.search_tracking import child_runs

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------
# The numbers


def test_trial_metrics_of_a_curve_that_peaks_and_drops():
    metrics = trial_metrics([0.5, 0.8, 0.6, 0.7])
    assert metrics["final_val_acc"] == 0.7 and metrics["best_val_acc"] == 0.8
    assert metrics["mean_val_acc"] == pytest.approx(0.65)
    # Lost since the best so far, per epoch: 0, 0, 0.2, 0.1; averaged over the 4 epochs.
    assert metrics["forgetting"] == pytest.approx(0.075)
    assert trial_metrics([0.1, 0.2, 0.3])["forgetting"] == 0.0


def test_paired_difference_is_scipys_paired_t_test():
    ours = {0: 0.90, 1: 0.85, 2: 0.88}
    ref = {0: 0.80, 1: 0.79, 2: 0.81}
    result = paired_difference(ours, ref)
    want = stats.ttest_rel([0.90, 0.85, 0.88], [0.80, 0.79, 0.81])
    interval = want.confidence_interval(0.95)
    assert result["n"] == 3 and result["diff"] == pytest.approx(np.mean([0.10, 0.06, 0.07]))
    assert (result["p"], result["ci_low"], result["ci_high"]) == pytest.approx((want.pvalue, interval.low,
                                                                                interval.high))
    assert result["exceeds"] is True  # consistent +6..10 points over three seeds
    noisy = paired_difference({0: 0.9, 1: 0.7, 2: 0.85}, ref)
    assert noisy["exceeds"] is False and noisy["ci_low"] < 0 < noisy["ci_high"]


def test_paired_difference_without_enough_pairs_or_spread():
    assert paired_difference({0: 0.9}, {0: 0.8})["exceeds"] is None  # one seed: no test
    assert paired_difference({0: 0.9, 1: None}, {0: 0.8, 1: 0.7})["n"] == 1  # a seed without a value drops out
    same = paired_difference({0: 0.9, 1: 0.8}, {0: 0.8, 1: 0.7})
    assert same["exceeds"] is True and same["ci_low"] == same["ci_high"] == pytest.approx(0.1)
    assert paired_difference({0: 0.9, 1: 0.8}, {0: 0.9, 1: 0.8})["exceeds"] is False


def test_summary_has_mean_and_spread_per_variant_and_no_test_for_the_reference():
    rows = [{"variant": v, "seed": s, **trial_metrics(accs), "test_acc": t, "wall_s": 10.0}
            for v, s, accs, t in (("a", 0, [0.5, 0.7], 0.71), ("a", 1, [0.6, 0.8], 0.79),
                                  ("ref", 0, [0.4, 0.5], 0.5), ("ref", 1, [0.5, 0.6], 0.6))]
    summary = summarise(rows, ["a", "ref"], "ref")
    assert summary[0]["best_val_acc_mean"] == pytest.approx(0.75)
    assert summary[0]["best_val_acc_std"] == pytest.approx(np.std([0.7, 0.8], ddof=1))
    assert summary[0]["best_val_acc_diff"] == pytest.approx(0.2) and summary[0]["test_acc_diff"] == pytest.approx(0.2)
    assert summary[1]["best_val_acc_diff"] is None and set(summary[1]) == set(summary[0])


# ----------------------------------------------------------------------------------------
# Bad input: a clear error, exit code 2, before Ray starts or anything is written


def test_trial_points_check_every_variant():
    base = preset("digits", memory_capacity=4)
    points = trial_points(base, [Variant("w", {"retention_weight": "0.1"}), Variant("n", {"memory_capacity": 0})],
                          [0, 1])
    # Every point sets every changed field (the base value where its variant leaves one alone).
    assert points == [{"retention_weight": 0.1, "memory_capacity": 4, "seed": 0},
                      {"retention_weight": 0.1, "memory_capacity": 4, "seed": 1},
                      {"retention_weight": 1.0, "memory_capacity": 0, "seed": 0},
                      {"retention_weight": 1.0, "memory_capacity": 0, "seed": 1}]
    with pytest.raises(ConfigError, match="variants order-2 and same are the same configuration"):
        trial_points(base, [Variant("order-2", {"retention_order": 2}), Variant("same", {"meta_lr": 0.1})], [0])
    with pytest.raises(ConfigError, match="variant x: 'seed' is set per trial by --seeds"):
        trial_points(base, [parse_variant("x:seed=3")], [0])


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "retention_weight=-1"], "config field 'retention_weight' = -1.0 is invalid: must be >= 0"),
    (["--variant", "late:retention_warmup_epochs=-2"], "variant late: config field 'retention_warmup_epochs'"),
    (["--variant", "big:replay_batch_size=x"], "'replay_batch_size' = 'x' is invalid: must be of type int"),
    (["--variants", "order-2,order-3"], "unknown variant(s) ['order-3']"),
    (["--seeds", "0,0"], "--seeds 0,0: seeds must be distinct"),
    (["--reference", "nope"], "--reference nope: not among the variants"),
    (["--from-search", "missing"], "--from-search missing: no search of that name"),
    (["--variant", "noequals"], "expected NAME:FIELD=VALUE"),
])
def test_bad_input_fails_before_ray_and_before_writing(tmp_path, capsys, args, message):
    storage = tmp_path / "compare"
    code = compare.main(["--preset", "digits", "--storage-path", str(storage),
                         "--search-storage", str(tmp_path / "search"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not ray.is_initialized() and not storage.exists()


# ----------------------------------------------------------------------------------------
# A real comparison: 2 variants x 2 seeds on digits, then one of its trials again, in one Ray session


@pytest.mark.slow
def test_comparison_on_digits_is_complete_and_repeatable(tmp_path, digits_teacher, capsys):
    teacher, _ = digits_teacher
    # No dashboard: nothing here reads it, and it costs ~3 CPU-seconds to start.
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        outputs = []
        # The repeat runs one variant at one seed: its trial must give the first run's numbers exactly.
        # --cpus-per-worker fixed: by default the repeat's lone trial would get all 4 CPUs, and 4 torch
        # threads sum in another order than 1; the same seed is bit-identical only on as many threads.
        for name, variants, seeds in (("first", "order-2,no-memory", "0,1"), ("again", "order-2", "0")):
            code = compare.main(["--preset", "digits", "--teacher", str(teacher), "--data-dir", str(tmp_path / "data"),
                                 "--epochs", "2", "--set", "iters_per_epoch=4", "--variants", variants,
                                 "--seeds", seeds, "--cpus-per-worker", "1", "--storage-path", str(tmp_path),
                                 "--name", name])
            assert code == 0
            outputs.append(capsys.readouterr().out)
    finally:
        ray.shutdown()

    trials = [pq.read_table(tmp_path / name / "trials.parquet").to_pylist() for name in ("first", "again")]
    assert [(r["variant"], r["seed"], r["status"], r["epochs"]) for r in trials[0]] == [
        ("order-2", 0, "completed", 2), ("order-2", 1, "completed", 2),
        ("no-memory", 0, "completed", 2), ("no-memory", 1, "completed", 2)]
    numbers = ("val_accs", "final_val_acc", "best_val_acc", "mean_val_acc", "test_acc", "forgetting")
    assert [{k: r[k] for k in numbers} for r in trials[0][:1]] == [{k: r[k] for k in numbers} for r in trials[1]]
    assert trials[0][0]["val_accs"] != trials[0][1]["val_accs"]  # the seed matters

    summary = pq.read_table(tmp_path / "first" / "summary.parquet").to_pylist()
    assert [entry["variant"] for entry in summary] == ["order-2", "no-memory"]
    assert summary[0]["best_val_acc_p"] is not None and summary[0]["reference"] == "no-memory"
    table = (tmp_path / "first" / "table.txt").read_text()
    assert table in outputs[0] and "difference to no-memory (paired t-test" in table
    assert (tmp_path / "first" / "curves.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(tracking.resolve_tracking_uri())
    experiment = client.get_experiment_by_name("lrra-compare")
    parents = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id],
                                                                   "tags.`lrra.kind` = 'comparison'")}
    parent = parents["first"]
    assert parent.info.status == "FINISHED" and parent.data.params["seeds"] == "0,1"
    assert parent.data.metrics["order-2/best_val_acc_mean"] == pytest.approx(summary[0]["best_val_acc_mean"])
    assert {"comparison/curves.png", "comparison/trials.parquet", "comparison/summary.parquet",
            "comparison/table.txt"} <= {f.path for f in client.list_artifacts(parent.info.run_id, "comparison")}
    children = child_runs(client, parent.info.run_id)
    assert sorted((run.data.tags[TAG_VARIANT], run.data.tags[TAG_SEED], run.info.status) for run in children) == [
        ("no-memory", "0", "FINISHED"), ("no-memory", "1", "FINISHED"),
        ("order-2", "0", "FINISHED"), ("order-2", "1", "FINISHED")]
    for run in children:  # each child holds its trial's curve and the config of its variant and seed
        row = next(r for r in trials[0] if r["tune_trial_id"] == run.data.tags["lrra.trial_id"])
        assert run.data.params["seed"] == str(row["seed"])
        assert run.data.metrics["val/best_student_acc"] == pytest.approx(row["best_val_acc"])
        assert run.data.params["memory_capacity"] == ("0" if row["variant"] == "no-memory" else "10")

