"""MLflow tracking of one run, with a real SQLite store in tmp_path: one tiny tracked digits
distillation serves the run, metric, image, model, registry and `eval` checks (the search's side:
tests/test_tracking_search.py)."""

import multiprocessing
import threading
import warnings

import pytest
from mlflow import MlflowClient

from lrra import tracking
from lrra.config import preset
from tests.tracking_helpers import (
    check_distill_run,
    check_eval_reproduces,
    distill_into,
    run_cli,
    toy_study,
    two_logged_trials,
)
from tune import search_tracking

pytestmark = pytest.mark.usefixtures("fast_system_metrics")



@pytest.fixture(scope="module")
def distilled(sqlite_store, digits_teacher, tmp_path_factory):
    """The CLI result of one tracked digits distillation into the SQLite store."""
    return distill_into(sqlite_store, digits_teacher[0], tmp_path_factory.mktemp("distill"))


# ----------------------------------------------------------------------------------------
# A distill run


def test_distill_logs_config_metric_histories_images_and_the_student(client, distilled):
    check_distill_run(client, distilled)


def test_logging_a_student_prints_no_warning_of_torch_export(sqlite_store, digits_teacher, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distill_into(sqlite_store, digits_teacher[0], tmp_path)
    assert not [w for w in caught if "No complete tensor" in str(w.message)]


def test_eval_of_the_champion_reproduces_the_logged_accuracy(client, distilled, tmp_path):
    check_eval_reproduces(client, distilled, client.tracking_uri, tmp_path, "lrra-digits-student")


def test_eval_with_the_wrong_preset_is_a_clear_error(sqlite_store, distilled, tmp_path):
    code, _, err = run_cli(["eval", "--model", distilled["model_uri"], "--preset", "mnist",
                            "--data-dir", str(tmp_path), "--tracking-uri", sqlite_store])
    assert code == 2 and "dataset='digits'" in err and "--preset" in err


def register(client: MlflowClient, name: str, model_uri: str, accuracies: list[float]) -> list[dict]:
    return [tracking.register_champion(client, name, model_uri, accuracy) for accuracy in accuracies]


def champion_version(client: MlflowClient, name: str) -> int:
    return int(client.get_model_version_by_alias(name, "champion").version)


@pytest.mark.parametrize("name, accuracies, champion", [
    ("better-replaces", [0.5, 0.7], 2),                # a better student takes the alias
    ("worse-refused", [0.7, 0.5], 1),                  # a worse one is registered but refused it
    ("equal-keeps", [0.5, 0.5], 1),                    # a tie keeps the older champion
    ("sequence", [0.5, 0.4, 0.5, 0.6, 0.55], 4),
])
def test_champion_is_the_best_registered_version(client, distilled, name, accuracies, champion):
    outcomes = register(client, name, distilled["model_uri"], accuracies)
    assert [o["version"] for o in outcomes] == list(range(1, len(accuracies) + 1))
    assert champion_version(client, name) == champion
    assert outcomes[-1]["champion"] == (champion == len(accuracies))
    assert [o["previous_champion_accuracy"] for o in outcomes[1:]] == [
        max(accuracies[:i]) for i in range(1, len(accuracies))]
    assert tracking.champion_accuracy(client, name) == accuracies[champion - 1]
    for number, accuracy in enumerate(accuracies, 1):  # each version records the accuracy it was registered with
        version = client.get_model_version(name, str(number))
        assert float(version.tags[tracking.VERSION_ACCURACY_TAG]) == accuracy
        assert version.source == distilled["model_uri"]


def test_a_registration_moves_an_alias_left_on_a_worse_version(client, distilled):
    # The state a lost race used to leave: the alias on version 2 though version 1 is better.
    register(client, "repaired", distilled["model_uri"], [0.9, 0.5])
    client.set_registered_model_alias("repaired", "champion", "2")
    [outcome] = register(client, "repaired", distilled["model_uri"], [0.3])
    assert not outcome["champion"] and champion_version(client, "repaired") == 1


class PausingClient(MlflowClient):
    """A real client whose first alias write waits: the registration using it is stopped between
    reading the registry and writing the alias, while another registration runs to its end."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.paused, self.resume = threading.Event(), threading.Event()

    def set_registered_model_alias(self, *args, **kwargs):
        if not self.paused.is_set():
            self.paused.set()
            assert self.resume.wait(timeout=120)
        return super().set_registered_model_alias(*args, **kwargs)


def test_a_stale_champion_write_is_corrected(client, distilled):
    """A worse student decides it is champion (empty registry), stalls, and writes the alias after
    a better student's registration has finished: the alias must still end on the better one."""
    stale = PausingClient(client.tracking_uri)
    worse = {}
    racer = threading.Thread(target=lambda: worse.update(
        tracking.register_champion(stale, "stale", distilled["model_uri"], 0.5)))
    racer.start()
    try:
        assert stale.paused.wait(timeout=120)
        better = tracking.register_champion(client, "stale", distilled["model_uri"], 0.9)
    finally:
        stale.resume.set()
        racer.join(timeout=120)
    assert better["champion"] and better["version"] == 2
    assert worse["version"] == 1 and not worse["champion"]
    assert champion_version(client, "stale") == 2 and tracking.champion_accuracy(client, "stale") == 0.9


def race_registrations(uri: str, name: str, model_uri: str, accuracies: list[float]) -> None:
    """Register one version per accuracy, each from its own thread and client, all let go at once."""
    start = threading.Barrier(len(accuracies))
    errors = []

    def race(accuracy: float) -> None:
        own = MlflowClient(uri)  # one client per registering process, as in two searches
        try:
            start.wait(timeout=60)
            tracking.register_champion(own, name, model_uri, accuracy)
        except Exception as err:  # reported by the assertion below, not lost in the thread
            errors.append(err)

    racers = [threading.Thread(target=race, args=(accuracy,)) for accuracy in accuracies]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=300)
    assert errors == []


def test_concurrent_registrations_leave_the_alias_on_the_best(client, distilled):
    accuracies = [0.6, 0.9, 0.3, 0.9, 0.7]
    for round_ in range(3):
        name = f"racing-{round_}"
        race_registrations(client.tracking_uri, name, distilled["model_uri"], accuracies)
        recorded = {int(v.version): float(v.tags[tracking.VERSION_ACCURACY_TAG])
                    for v in client.search_model_versions(f"name = '{name}'")}
        assert sorted(recorded.values()) == sorted(accuracies)
        # The earliest of the two 0.9 versions, whichever racers registered them.
        assert champion_version(client, name) == min(v for v, a in recorded.items() if a == 0.9)


@pytest.mark.parametrize("preset_name, overrides, expected", [
    ("mnist", {}, "lrra-mnist-student"),
    ("mnist", {"dataset": "FashionMNIST"}, "lrra-fashionmnist-student"),
    ("digits", {}, "lrra-digits-student"),
    ("tiny-imagenet", {}, "lrra-tiny-imagenet-student"),
    ("cifar10", {"dataset": "imagefolder:/data/Flowers 102/"}, "lrra-flowers-102-student"),
])
def test_registered_model_is_named_after_what_was_distilled(preset_name, overrides, expected):
    assert tracking.registered_model_name(preset(preset_name, **overrides)) == expected


def test_search_registers_its_best_student_under_the_distilled_dataset(client, distilled):
    """A search on the mnist preset with dataset=FashionMNIST registers lrra-fashionmnist-student."""
    tracker = two_logged_trials(client, "fashion", distilled["model_uri"])
    study = toy_study(2)
    outcomes = {"trial_a": ("FINISHED", "completed"), "trial_b": ("FINISHED", "completed")}
    best_student = search_tracking.best_logged_student(client, tracker.run_id)
    registered = tracker.finish(study, study.trials_dataframe(), outcomes, preset("mnist", dataset="FashionMNIST"),
                                interrupted=False, best_student=best_student)
    tracker.end()
    assert registered["name"] == "lrra-fashionmnist-student"
    assert tracking.champion_accuracy(client, "lrra-fashionmnist-student") == 0.8


# ----------------------------------------------------------------------------------------
# A new SQLite store opened by two processes at once


def _open_store_and_experiment(uri: str, barrier, results) -> None:
    barrier.wait(timeout=60)
    try:
        results.put(tracking.store.ensure_experiment(tracking.store.connect(uri), "opened-together"))
    except Exception as err:  # noqa: BLE001 - the parent asserts on what went wrong
        results.put(f"{type(err).__name__}: {err}"[:300])


def test_two_processes_opening_a_new_sqlite_store_at_once_both_get_the_experiment(tmp_path):
    """Two `lrra distill` started together on a new mlflow.db: both ran MLflow's schema migrations
    and one died ("duplicate column name: step"), or both created the experiment ("UNIQUE constraint
    failed"). Forked processes released together, three new stores, so that the race is likely."""
    context = multiprocessing.get_context("fork")
    for store in range(3):
        uri = f"sqlite:///{tmp_path / f'store{store}.db'}"
        barrier, results = context.Barrier(2), context.Queue()
        processes = [context.Process(target=_open_store_and_experiment, args=(uri, barrier, results))
                     for _ in range(2)]
        for process in processes:
            process.start()
        answers = [results.get(timeout=120) for _ in processes]
        for process in processes:
            process.join(timeout=30)
        assert answers[0] == answers[1] and answers[0].isdigit(), answers
        assert MlflowClient(uri).get_experiment(answers[0]).name == "opened-together"


def test_a_run_shorter_than_the_sampling_interval_still_records_system_metrics(client, monkeypatch):
    """MLflow's sampler publishes only after a whole interval; a run's end records one last sample."""
    from lrra.tracking.epochs import finish_system_metrics, start_system_metrics

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "60")
    run = client.create_run(tracking.store.ensure_experiment(client, "short-run"))
    finish_system_metrics(start_system_metrics(run.info.run_id, client.tracking_uri))
    assert any(name.startswith("system/cpu") for name in client.get_run(run.info.run_id).data.metrics)


def test_two_trials_logging_the_same_new_datasets_at_once_both_get_them(tmp_path):
    """The race of two trials starting together, with real MLflow on SQLite and only its timing
    forced: trial B's MLflow looks the evaluation datasets up, finds none, and just before it
    inserts them trial A (another connection) inserts the same ones. B's insert breaks MLflow's
    uniqueness of (experiment, name, digest); logging again links the datasets to B's run."""
    import sqlalchemy

    from lrra.splits import evaluation_splits
    from lrra.tracking.epochs import log_evaluation_inputs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = preset("digits", data_dir=str(tmp_path / "data"))
    evaluation = evaluation_splits(cfg, {})  # a teacher of unknown training: halves of the test split
    first, second = tracking.connect(uri), MlflowClient(uri)  # two clients, two connection pools
    experiment = first.create_experiment("race")
    run_a, run_b = (first.create_run(experiment).info.run_id for _ in range(2))

    engine = second._tracking_client.store.engine
    raced = []

    def trial_a_inserts_first(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("INSERT INTO DATASETS") and not raced:
            raced.append(statement)
            log_evaluation_inputs(first, run_a, cfg, evaluation)

    sqlalchemy.event.listen(engine, "before_cursor_execute", trial_a_inserts_first)
    try:
        log_evaluation_inputs(second, run_b, cfg, evaluation)
    finally:
        sqlalchemy.event.remove(engine, "before_cursor_execute", trial_a_inserts_first)

    assert raced  # B did reach its insert after A had logged the same datasets
    for run_id in (run_a, run_b):
        contexts = {tag.value for d in first.get_run(run_id).inputs.dataset_inputs for tag in d.tags}
        assert contexts == {"validation", "test"}
    names = {d.dataset.name for d in first.get_run(run_b).inputs.dataset_inputs}
    assert len(names) == 2
