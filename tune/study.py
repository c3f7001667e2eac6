"""The Optuna side of the search: a persistent study that Tune's OptunaSearch fills.

The study lives in an Optuna RDB storage (SQLite by default), so ``optuna-dashboard`` and
``optuna.load_study`` read it while the search runs. It is the search's record of every trial:
params, the per-epoch student accuracy (intermediate values, step = epoch), the final value,
the state and why the trial ended (user attribute ``stop_reason``):

    COMPLETE  ran all its epochs                       stop_reason "completed"
    PRUNED    ASHA stopped it early                    "early-stopped"
    PRUNED    the time budget ended it                 "time budget"
    FAIL      its loss went NaN/inf (intermediate       "diverged"
              values kept: its best-so-far accuracy)
    FAIL      it raised, or it never ran               "error" / "abandoned"

A pruned trial's value is its last accuracy (Optuna's rule), which TPE ranks below the trials
that completed.

The study, not Tune's saved state, is the truth about a trial: Tune saves its experiment state
(its trials and this searcher) every ~10 s, so a driver killed between two saves leaves Tune
believing in an older state. A resumed search therefore checks the stored state before writing
anything, and takes over the trials asked after Tune's last save (see StudySearch).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.samplers import TPESampler
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search.optuna import OptunaSearch

from lrra.config import ConfigError
from lrra.library_hooks import optuna_search_study, optuna_search_trials
from lrra.metric_names import BEST_VALIDATION_METRIC, DIVERGED_KEY, TEST_METRIC, VALIDATION_METRIC
from tune.space import Space

METRIC_NAME = "val/best_student_acc (the student kept)"  # Optuna's name for a completed trial's value
TEST_ACC = "test_acc"                  # user attribute holding it
EPOCHS_DONE = "epochs_done"            # reported by tune/trial.py; ASHA's time attribute
TUNE_TRIAL_ID = "tune_trial_id"        # user attribute: the Tune trial behind an Optuna trial
STOP_REASON = "stop_reason"            # user attribute, see the module docstring
EARLIER_TUNE_IDS = "earlier_tune_trial_ids"  # user attribute: Tune trials lost to a killed driver
OPTUNA_NUMBER = "optuna_trial_number"  # added to each trial's config: joins Tune results and the study
ALREADY_FINISHED = "already_finished"  # in a result re-reported by a trial the study already finished
# Study user attribute: the Optuna number of the trial whose student is the search's best, the one
# registered. Optuna's own best_trial counts complete trials only, and a trial cut by the time
# budget can hold the best student (tune/cut_trials.py).
BEST_STUDENT_TRIAL = "best_student_trial"

COMPLETED, EARLY_STOPPED, TIME_BUDGET, DIVERGED, ERROR, ABANDONED = (
    "completed", "early-stopped", "time budget", "diverged", "error", "abandoned")


def default_study_storage(storage_path: str) -> str:
    """A SQLite file next to the experiments; a remote --storage-path keeps it in this folder."""
    folder = Path(storage_path) if "://" not in storage_path else Path.cwd()
    return f"sqlite:///{(folder / 'optuna.db').absolute()}"


def open_storage(url: str) -> RDBStorage:
    """An RDBStorage for ``url`` (creating the tables), or a ConfigError saying why not."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        return RDBStorage(url)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy raises many types for a bad URL or an unreachable server
        raise ConfigError(f"--study-storage {url}: cannot open it as an Optuna storage ({type(err).__name__}: "
                          f"{str(err).splitlines()[0]})") from None


def load_study(storage_url: str, study_name: str) -> optuna.Study:
    return optuna.load_study(study_name=study_name, storage=storage_url)


class StudySearch(OptunaSearch):
    """OptunaSearch on a persistent study, keeping the study's record true to what Tune did.

    Differences from OptunaSearch: the sampler is a seeded multivariate TPE; intermediate values
    are stored per epoch (not per Tune iteration, which restarts at 1 when a trial resumes);
    a trial stopped before its last epoch is PRUNED rather than COMPLETE; every trial records
    its Tune trial id and stop reason.

    Idempotent against the storage, for a search resumed after its driver was killed: a trial
    that the study already holds as finished is never written again, and a RUNNING trial that
    Tune no longer knows (asked after Tune's last save) is handed to the next Tune trial
    instead of asking Optuna for a new one, so the study keeps one trial per planned trial.
    """

    def __init__(self, space: Space, *, storage: RDBStorage, study_name: str, seed: int, epochs: int,
                 points_to_evaluate: list[dict], n_startup_trials: int,
                 attributes: dict[str, Any] | None = None) -> None:
        """``attributes``: the study's user attributes (where its MLflow runs, folder and teacher are)."""
        # TPE models the space only after n_startup_trials random ones; a short search gets a
        # shorter random phase so that half of it is guided.
        sampler = TPESampler(seed=seed, multivariate=True, n_startup_trials=n_startup_trials)
        self._epochs = epochs
        if stored_trials(storage, study_name):
            # A search started over (its driver was killed before Tune saved any state): the
            # points were enqueued by the first start; enqueueing them again would run them twice.
            points_to_evaluate = None
        super().__init__(space={name: knob.distribution() for name, knob in space.items()}, metric=VALIDATION_METRIC,
                         mode="max", points_to_evaluate=points_to_evaluate, sampler=sampler,
                         study_name=study_name, storage=storage)
        # The storage itself, not the study's cache of it: reads see what any driver stored.
        self.study_storage = storage
        self._study_id = storage.get_study_id_from_name(study_name)
        self._trial_ids: dict[int, int] = {}  # Optuna number -> the storage's trial id (never changes)
        self._told: set[str] = set()  # Tune trials whose Optuna trial is finished
        study = optuna_search_study(self)
        # A completed trial's value is its kept student's validation accuracy, the figure the champion
        # carries (intermediate values: each epoch's, which ASHA reads); the dashboard names its axis so.
        with warnings.catch_warnings():  # "experimental since 3.2": nothing the person searching can act on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC_NAME])
        for key, value in (attributes or {}).items():
            study.set_user_attr(key, value)

    def suggest(self, trial_id: str) -> dict | None:
        orphan = self._orphan()
        if orphan is not None:
            self._adopt(trial_id, orphan)
        config = super().suggest(trial_id)
        ot_trial = optuna_search_trials(self)[trial_id]
        ot_trial.set_user_attr(TUNE_TRIAL_ID, trial_id)
        return {**config, OPTUNA_NUMBER: ot_trial.number}

    def _orphan(self) -> FrozenTrial | None:
        """The oldest RUNNING trial of the study that belongs to no Tune trial this searcher knows."""
        known = set(optuna_search_trials(self))
        running = optuna_search_study(self).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return next((t for t in running if t.user_attrs.get(TUNE_TRIAL_ID) not in known), None)

    def _adopt(self, trial_id: str, orphan: FrozenTrial) -> None:
        # Same params and Optuna number: the planned trial runs again under a new Tune trial id.
        earlier = [*orphan.user_attrs.get(EARLIER_TUNE_IDS, []), orphan.user_attrs.get(TUNE_TRIAL_ID)]
        stored_id = self._stored_id(orphan.number)
        self.study_storage.set_trial_user_attr(stored_id, EARLIER_TUNE_IDS, [i for i in earlier if i])
        optuna_search_trials(self)[trial_id] = optuna.Trial(optuna_search_study(self), stored_id)

    def _stored_id(self, number: int) -> int:
        """The storage's id of the study's trial ``number`` (Optuna's trials keep theirs private)."""
        if number not in self._trial_ids:
            self._trial_ids[number] = self.study_storage.get_trial_id_from_study_id_trial_number(
                self._study_id, number)
        return self._trial_ids[number]

    def _live_trial(self, trial_id: str) -> FrozenTrial | None:
        """The stored trial behind ``trial_id``, or None when it is finished (an earlier driver told
        it): a finished trial must not be written again."""
        if trial_id in self._told:
            return None
        stored = self.study_storage.get_trial(self._stored_id(optuna_search_trials(self)[trial_id].number))
        if stored.state.is_finished():
            self._told.add(trial_id)
            return None
        return stored

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if result.get(DIVERGED_KEY) or VALIDATION_METRIC not in result:
            return  # a diverged trial's last result repeats its last good epoch
        stored = self._live_trial(trial_id)
        epoch = int(result[EPOCHS_DONE])
        # The stored values, not a counter: a restored searcher's counter may lag the study.
        if stored is None or epoch in stored.intermediate_values:
            return
        optuna_search_trials(self)[trial_id].report(result[VALIDATION_METRIC], step=epoch)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._live_trial(trial_id) is None:
            return
        reason, state, value = self.outcome(result, error)
        if state != TrialState.FAIL:
            # A result that makes the scheduler stop a trial reaches on_trial_complete only.
            self.on_trial_result(trial_id, result)
        ot_trial = optuna_search_trials(self)[trial_id]
        ot_trial.set_user_attr(STOP_REASON, reason)
        if state == TrialState.COMPLETE and result.get(TEST_METRIC) is not None:
            ot_trial.set_user_attr(TEST_ACC, result[TEST_METRIC])
        optuna_search_study(self).tell(ot_trial, value, state=state, skip_if_finished=True)
        self._told.add(trial_id)

    def outcome(self, result: dict | None, error: bool) -> tuple[str, TrialState, float | None]:
        """(stop reason, Optuna state, value) of a trial that ends with ``result``."""
        if result and result.get(DIVERGED_KEY):
            return DIVERGED, TrialState.FAIL, None
        if error or not result or VALIDATION_METRIC not in result:
            return ERROR, TrialState.FAIL, None
        if int(result[EPOCHS_DONE]) < self._epochs:
            # Tune calls this for a trial that ends before its last epoch only when the scheduler
            # stops it; the time budget and Ctrl-C stop trials without it (see settle_unfinished).
            return EARLY_STOPPED, TrialState.PRUNED, None
        # The best epoch's student is the one kept, so TPE learns what the search delivers. A pruned
        # trial's value is its last epoch's (Optuna's rule: it takes no value of ours).
        return COMPLETED, TrialState.COMPLETE, result.get(BEST_VALIDATION_METRIC, result[VALIDATION_METRIC])


def stored_trials(storage: RDBStorage, study_name: str) -> list[FrozenTrial]:
    """The trials already stored for ``study_name`` (none when the study does not exist yet)."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return []
    return storage.get_all_trials(study_id, deepcopy=False)


def finished_results(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """Tune trial id -> the last result of each trial the study holds as finished.

    A resumed search hands these to the trials that Tune's saved state still calls unfinished
    (tune/trial.py): such a trial reports its stored result once instead of running again.
    """
    results = {}
    for trial in study.get_trials(deepcopy=False):
        tune_id = trial.user_attrs.get(TUNE_TRIAL_ID)
        if tune_id is None or not trial.state.is_finished():
            continue
        values = trial.intermediate_values
        result = {ALREADY_FINISHED: trial.user_attrs.get(STOP_REASON, trial.state.name.lower())}
        if values:
            last = max(values)
            result.update({EPOCHS_DONE: last, "epoch": last - 1, VALIDATION_METRIC: values[last],
                           BEST_VALIDATION_METRIC: max(values.values()),
                           TEST_METRIC: trial.user_attrs.get(TEST_ACC)})
        results[tune_id] = result
    return results


def settle_unfinished(study: optuna.Study, storage: RDBStorage, resumable: set[str], known: set[str],
                      reason: str) -> int:
    """Close the study's RUNNING trials that no Tune trial will continue; returns how many.

    Tune ends trials without telling the searcher in two cases: the time budget runs out (the
    trials become TERMINATED), and the driver is interrupted (they stay RUNNING in Tune's saved
    state and resume with --resume). ``resumable`` holds the Tune trial ids that will continue;
    every other RUNNING trial is closed: with ``reason`` when Tune knows its trial (``known``),
    else as ABANDONED (asked after Tune's last state save by a killed driver, and not taken over
    by a resumed one). PRUNED with its last accuracy when it reported any, else FAIL.
    ``storage``: the study's storage (Optuna keeps a study's own private).
    """
    settled = 0
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tune_id = trial.user_attrs.get(TUNE_TRIAL_ID)
        if tune_id in resumable:
            continue
        ran = bool(trial.intermediate_values)
        # Optuna's public set_user_attr lives on a live Trial; this one belongs to no running code.
        storage.set_trial_user_attr(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number),
                                    STOP_REASON, reason if tune_id in known else ABANDONED)
        study.tell(trial.number, state=TrialState.PRUNED if ran else TrialState.FAIL)
        settled += 1
    return settled


def record_best_student(study: optuna.Study, rows: list[dict[str, Any]], tune_trial_id: str | None) -> None:
    """Name the trial of the search's best student (its Tune id) on the study, as BEST_STUDENT_TRIAL."""
    number = next((row["optuna_trial_number"] for row in rows if row["tune_trial_id"] == tune_trial_id), None)
    if number is not None:
        study.set_user_attr(BEST_STUDENT_TRIAL, number)


def trial_rows(study: optuna.Study, knobs: list[str], train_path: str) -> list[dict[str, Any]]:
    """One row per trial the search asked for: its configuration, accuracies, epochs, stop reason and
    wall time. Points enqueued but never asked (a search cut by its time budget) are left out."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.WAITING:
            continue
        accs = [trial.intermediate_values[step] for step in sorted(trial.intermediate_values)]
        tune_id = trial.user_attrs.get(TUNE_TRIAL_ID)
        end = trial.datetime_complete
        rows.append({
            "optuna_trial_number": trial.number,
            "tune_trial_id": tune_id,
            **{knob: trial.params.get(knob) for knob in knobs},
            "final_val_acc": accs[-1] if accs else None,
            "best_val_acc": max(accs) if accs else None,
            "test_acc": trial.user_attrs.get(TEST_ACC),  # completed trials: their chosen student's
            "epochs": max(trial.intermediate_values, default=0),
            "stop_reason": trial.user_attrs.get(STOP_REASON, "running" if trial.state == TrialState.RUNNING else None),
            "state": trial.state.name,
            # Start to end, including any time the search spent interrupted before a --resume.
            "wall_s": (end - trial.datetime_start).total_seconds() if end and trial.datetime_start else None,
            "train_run": f"{train_path}/{tune_id}" if tune_id else None,
        })
    return rows
