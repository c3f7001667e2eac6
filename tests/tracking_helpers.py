"""What the MLflow tracking tests share: a tiny tracked distillation through the CLI, the checks of
what it logged, and small search fixtures (a parent run with two trials, a synthetic Optuna study)."""

import contextlib
import importlib.util
import io
import json

import optuna
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from lrra import metric_names, tracking
from lrra.cli import main
from lrra.config import preset
from tune import search_tracking

EPOCHS = 3
# Tiny budget: these tests check what is logged, not how well the student learns.
DISTILL = ["distill", "--preset", "digits", "--epochs", str(EPOCHS),
           "--set", "iters_per_epoch=2", "--set", "kd_steps=2"]
PER_EPOCH_METRICS = ["epoch", "val/student_acc", "val/best_student_acc", "val/mean_student_acc",
                     "loss/generator", "loss/student_total", "memory/size", "perf/student_steps_per_s"]


def run_cli(argv: list[str]) -> tuple[int, dict | None, str]:
    """(exit code, the JSON line printed, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    lines = out.getvalue().strip().splitlines()
    return code, json.loads(lines[-1]) if lines else None, err.getvalue()


def distill_into(uri: str, teacher_path, workdir) -> dict:
    code, result, err = run_cli([*DISTILL, "--teacher", str(teacher_path), "--out", str(workdir / "run"),
                                 "--data-dir", str(workdir / "data"), "--tracking-uri", uri])
    assert code == 0, err
    return result


def image_steps(client: MlflowClient, run_id: str) -> list[int]:
    """The steps (epochs, from 1) at which the run logged its generated-image grid (key "generated")."""
    files = [f.path for f in client.list_artifacts(run_id, "images")]
    return sorted(int(path.split("+step+")[1].split("+")[0]) for path in files
                  if path.startswith(f"images/{tracking.IMAGE_KEY}+step+") and path.endswith(".png"))


def check_distill_run(client: MlflowClient, result: dict) -> None:
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_KIND] == "distill" and MLFLOW_PARENT_RUN_ID not in run.data.tags
    assert run.data.tags["lrra.version.mlflow"] == "3.17.2"
    cfg = preset("digits", epochs=EPOCHS, iters_per_epoch=2, kd_steps=2)
    for name in ("preset", "epochs", "iters_per_epoch", "meta_lr", "student_arch", "retention_order"):
        assert run.data.params[name] == str(getattr(cfg, name))
    for name in PER_EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == list(range(1, EPOCHS + 1)), name
    assert run.data.metrics["val/best_student_acc"] == result["best_val_acc"]
    assert run.data.metrics["test/best_student_acc"] == result["test_acc"] is not None
    if importlib.util.find_spec("psutil"):  # MLflow's system metrics need it; without it they are skipped
        assert any(name.startswith("system/cpu") for name in run.data.metrics)
    assert image_steps(client, run.info.run_id) == [1, 3]  # the first and the last epoch
    contexts = {i.tags[0].value: i.dataset.name for i in run.inputs.dataset_inputs}
    assert sorted(contexts) == ["test", "validation"] and contexts["validation"].startswith("digits validation (")
    [output] = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.experiment_id == run.info.experiment_id and result["model_uri"] == f"models:/{model.model_id}"
    assert model.params["student.arch"] == "convnet_half" and model.params["student.dataset"] == "digits"


def check_eval_reproduces(client: MlflowClient, result: dict, uri: str, tmp_path, model_name: str) -> None:
    registered = tracking.register_champion(client, model_name, result["model_uri"], result["best_val_acc"],
                                            result["test_acc"])
    version = client.get_model_version(model_name, str(registered["version"]))
    assert version.source == result["model_uri"]
    assert float(version.tags[tracking.VERSION_ACCURACY_TAG]) == result["best_val_acc"]
    assert float(version.tags["test_accuracy"]) == result["test_acc"]
    code, evaluated, err = run_cli(["eval", "--model", f"models:/{model_name}@champion",
                                    "--preset", "digits", "--data-dir", str(tmp_path), "--tracking-uri", uri])
    assert code == 0, err
    assert evaluated["test_accuracy"] == evaluated["logged_accuracy"] == result["test_acc"]
    assert evaluated["test_examples"] == 360


def two_logged_trials(client, name: str, model_uri: str | None = None) -> search_tracking.SearchTracker:
    """A search's parent run with two trial runs, validation 0.4 (trial_a) and 0.8 (trial_b), each
    with ``model_uri`` as its logged student when given."""
    tracker = search_tracking.SearchTracker(client.tracking_uri, f"{name}-search", {}, resume=False,
                                            run_name=name, tags={})
    for trial, accuracy in (("trial_a", 0.4), ("trial_b", 0.8)):
        run_id = tracking.open_trial_run(client, tracker.run_id, trial)
        client.log_metric(run_id, metric_names.BEST_VALIDATION_METRIC, accuracy)
        if model_uri is not None:
            client.set_tag(run_id, tracking.TAG_MODEL_URI, model_uri)
    return tracker


def toy_study(trials: int, vary: bool = True) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        lr = trial.suggest_float("meta_lr", 0.01, 1.0, log=True) if vary else 0.1
        order = trial.suggest_categorical("retention_order", [1, 2])
        for epoch in range(3):  # a validation curve, as a search's trials report one
            trial.report(lr * order * (epoch + 1) / 3, epoch + 1)
        return lr * order

    study.optimize(objective, n_trials=trials)
    return study
