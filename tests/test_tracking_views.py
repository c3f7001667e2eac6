"""What the MLflow UI and Optuna's dashboard show of a search, read back from real stores (SQLite):
the experiment's kind, the trial runs' names, the parent run's summary and description, the
registry's descriptions, the study's metric name and attributes."""

from pathlib import Path

import optuna
from mlflow import MlflowClient
from optuna.storages import RDBStorage

from lrra import metric_names, tracking
from lrra.tracking.runs import open_trial_run, trial_run_name
from lrra.tracking.store import EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT, ensure_experiment
from tune import search_tracking
from tune.space import log_range
from tune.study import METRIC_NAME, StudySearch

ROOT = Path(__file__).resolve().parent.parent


def client_for(tmp_path) -> MlflowClient:
    return tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_experiments_open_on_training_runs_also_when_they_existed_before(tmp_path):
    client = client_for(tmp_path)
    new = ensure_experiment(client, "fresh")
    assert client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT
    older = client.create_experiment("older")  # as an earlier version of this project made it
    assert ensure_experiment(client, "older") == older
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT


def test_a_trial_run_is_named_by_its_optuna_number_and_tune_id(tmp_path):
    client = client_for(tmp_path)
    parent = search_tracking.open_search_run(client, "s", {"num_samples": 3})
    run_id = open_trial_run(client, parent, "107ed640", optuna_trial_number=5)
    assert client.get_run(run_id).info.run_name == "trial-05 · 107ed640" == trial_run_name("107ed640", 5)
    assert trial_run_name("107ed640", None) == "107ed640"  # a comparison's trials have no Optuna number


def test_the_parent_run_summarises_the_search(tmp_path):
    client = client_for(tmp_path)
    params = {"preset": "mnist", "dataset": "letters", "teacher_arch": "lenet5", "student_arch": "lenet5_half",
              "epochs": 30, "num_samples": 4, "teacher.path": "/t.pt", "space.meta_lr": "0.02 .. 0.2 (log)"}
    parent = search_tracking.open_search_run(client, "s", params)
    note = client.get_run(parent).data.tags[search_tracking.NOTE]
    assert "dataset letters" in note and "meta_lr" in note and "/t.pt" in note
    for number, (val, test) in enumerate([(0.91, 0.90), (0.93, 0.925), (0.5, None)]):
        run_id = open_trial_run(client, parent, f"id{number}", optuna_trial_number=number)
        client.log_metric(run_id, metric_names.BEST_VALIDATION_METRIC, val)
        if test is not None:
            client.log_metric(run_id, metric_names.TEST_METRIC, test)
    metrics = search_tracking.log_search_summary(client, parent, ["completed", "completed", "early-stopped",
                                                                  "time budget"])
    logged = client.get_run(parent).data
    assert logged.metrics == metrics
    assert metrics["search/trials_completed"] == 2 and metrics["search/trials_early_stopped"] == 1
    assert metrics["search/trials_cut_by_budget"] == 1 and metrics["search/trials_diverged"] == 0
    assert metrics["search/best_val_acc"] == 0.93 and metrics["search/best_test_acc"] == 0.925
    assert logged.tags[search_tracking.TAG_BEST_TRIAL] == "trial-01 · id1"
    assert "**Champion: trial-01 · id1**, validation 0.9300, test 0.9250, 2.00 points over trial-00 · id0" \
        in logged.tags[search_tracking.NOTE]
    search_tracking.log_search_summary(client, parent, ["completed"] * 4)  # a resumed search: said once
    assert client.get_run(parent).data.tags[search_tracking.NOTE].count("Champion") == 1


def test_registered_students_carry_descriptions(tmp_path):
    from lrra.models import build_classifier
    from lrra.tracking.student import log_student_model

    client = client_for(tmp_path)
    run_id = client.create_run(ensure_experiment(client, "e")).info.run_id
    meta = {"arch": "convnet_half", "dataset": "digits", "num_classes": 10, "channels": 1, "image_size": 8,
            "mean": [0.3], "std": [0.4], "test_accuracy": 0.8, "best_epoch": 0}
    uri = log_student_model(client, run_id, build_classifier("convnet_half", 10, 1).eval(), meta)
    answer = tracking.register_champion(client, "lrra-digits-student", uri, 0.85, 0.8)
    version = client.get_model_version("lrra-digits-student", str(answer["version"]))
    assert "validation accuracy 0.8500, test accuracy 0.8000" in version.description
    assert "models:/lrra-digits-student@champion" in client.get_registered_model("lrra-digits-student").description


def test_the_study_names_its_value_and_says_where_its_runs_are(tmp_path):
    storage = RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    StudySearch({"meta_lr": log_range(0.02, 0.2)}, storage=storage, study_name="s", seed=0, epochs=3,
                           points_to_evaluate=[], n_startup_trials=1,
                           attributes={"mlflow_experiment": "lrra-search", "teacher": "/t.pt"})
    study = optuna.load_study(study_name="s", storage=storage)
    assert study.metric_names == [METRIC_NAME]
    assert study.user_attrs == {"mlflow_experiment": "lrra-search", "teacher": "/t.pt"}


def test_a_students_metadata_is_its_own_not_its_teachers(digits_teacher, tmp_path, capsys):
    import json

    import torch

    from lrra.cli import main

    path, teacher_meta = digits_teacher
    out = tmp_path / "run"
    assert main(["distill", "--preset", "digits", "--teacher", str(path), "--epochs", "2", "--set", "iters_per_epoch=2",
                 "--out", str(out), "--tracking-uri", "none"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    meta = torch.load(out / "best_student.pt", weights_only=True)["meta"]
    assert meta["epochs"] == 2 != teacher_meta["epochs"] and "train_seconds" not in meta
    assert meta["arch"] == "convnet_half" and meta["teacher_arch"] == "convnet"
    assert meta["val_accuracy"] == result["best_val_acc"] and meta["test_accuracy"] == result["test_acc"]
    assert (meta["mean"], meta["std"], meta["validation"]) == (teacher_meta["mean"], teacher_meta["std"],
                                                               teacher_meta["validation"])
