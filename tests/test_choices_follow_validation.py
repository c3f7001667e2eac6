"""A search chooses on validation only: ASHA, Optuna, the best epoch and the champion, shown with a
planted disagreement between validation and test.

The data is scikit-learn's digits as an image folder (``imagefolder:PATH``) whose *test* labels are
shifted by one class (y -> y+1 mod 10). Validation is the teacher's held-out training images, labelled
correctly. On that test split a student that learns scores below chance (it is right only where it
errs to the next class), while one that learns nothing scores about chance (it predicts mostly one
class, a tenth of the test images). So every choice made on test would prefer the useless trial;
made on validation, it prefers the learning one.
"""

import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from optuna.trial import TrialState
from PIL import Image
from sklearn.datasets import load_digits

from lrra import teacher as teacher_module
from lrra import tracking
from lrra.config import preset
from lrra.teacher import save_teacher, train_teacher
from tests.search_records import study_of
from tests.services import ROOT, USELESS_TRIAL, search_command
from tune.study import BEST_STUDENT_TRIAL

EPOCHS = 3
ITERATIONS = 80  # per epoch, 8x the smoke test's: on RGB copies of 8x8 digits the student learns slowly
# (validation ~43 % after 3 epochs here, ~30 % with 40 iterations)
CHANCE = 0.1


def write_planted_digits(root: Path, test_size: int = 360) -> None:
    """digits as PNG class folders: train/ labelled truly, test/ with every label shifted by one."""
    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    split = len(images) - test_size
    for folder, first, last, shift in (("train", 0, split, 0), ("test", split, len(images), 1)):
        for index in range(first, last):
            label = (int(digits.target[index]) + shift) % 10
            target = root / folder / str(label)
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index], mode="L").save(target / f"{index}.png")


@pytest.fixture(scope="module")
def planted_search(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted-digits")
    write_planted_digits(root)
    dataset = f"imagefolder:{root}"
    cfg = preset("digits", dataset=dataset, channels=3, data_dir=str(root), teacher_epochs=15)  # folders load as RGB
    # Image folders get natural-image augmentation (4-pixel crops, flips), which ruins 8x8 digits;
    # these are digits, so their teacher trains as the digits preset's does.
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(teacher_module.AUGMENTATIONS, "imagefolder:", teacher_module.NO_AUGMENTATION)
        teacher, meta = train_teacher(cfg)
    teacher_path = save_teacher(teacher, meta, root / "teacher.pt")

    storage = tmp_path_factory.mktemp("search")
    tracking_uri = f"sqlite:///{storage / 'mlflow.db'}"
    # memory_capacity fixed, so there is no memory counterpart: the preset's trial, then the useless one,
    # one at a time so that the useless trial meets the learning one's result at ASHA's first rung.
    command = search_command(storage, teacher_path, "--name", "planted", "--set", f"dataset={dataset}",
                             "--set", "channels=3", "--set", "memory_capacity=0", "--epochs", str(EPOCHS),
                             "--set", f"iters_per_epoch={ITERATIONS}",
                             "--num-samples", "2", "--max-concurrent-trials", "1", "--tracking-uri", tracking_uri,
                             *USELESS_TRIAL)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = pq.read_table(storage / "planted" / "results.parquet").to_pylist()
    rows = {row["optuna_trial_number"]: row for row in results}
    study = study_of(storage, "planted")
    return meta, rows, study, tracking.connect(tracking_uri), tracking.registered_model_name(cfg)


@pytest.mark.slow
def test_the_planted_disagreement_is_real(planted_search):
    meta, rows, *_ = planted_search
    learning = rows[0]
    assert meta["validation"]["holdout"] > 0  # validation: held-out training images, labels untouched
    assert learning["best_val_acc"] > 3 * CHANCE  # it learns...
    assert learning["test_acc"] < CHANCE  # ...so on the shifted test labels it scores below a constant guess


@pytest.mark.slow
def test_asha_and_optuna_follow_validation(planted_search):
    _, rows, study, *_ = planted_search
    learning, useless = rows[0], rows[1]
    assert useless["student_lr"] == pytest.approx(1e-5)
    assert useless["best_val_acc"] < learning["best_val_acc"]
    assert useless["stop_reason"] == "early-stopped" and useless["epochs"] == 1  # ASHA's first rung
    assert learning["stop_reason"] == "completed" and learning["epochs"] == EPOCHS
    assert study.best_trial.number == 0 and study.user_attrs[BEST_STUDENT_TRIAL] == 0
    for trial in study.trials:  # Optuna's values and intermediate values are validation accuracies
        row = rows[trial.number]
        kept = row["best_val_acc"] if trial.state == TrialState.COMPLETE else row["final_val_acc"]
        assert trial.value == pytest.approx(kept)
        assert max(trial.intermediate_values.values()) == pytest.approx(row["best_val_acc"])


@pytest.mark.slow
def test_the_best_epoch_and_the_champion_follow_validation(planted_search):
    _, rows, study, client, model_name = planted_search
    curve = study.trials[0].intermediate_values  # epochs done -> validation accuracy
    best_epoch = max(sorted(curve), key=lambda done: curve[done])  # the first best, in epochs done
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    by_model = {r.data.tags[tracking.TAG_MODEL_URI]: r for r in runs if tracking.TAG_MODEL_URI in r.data.tags}
    champion = client.get_model_version_by_alias(model_name, "champion")
    run = by_model[champion.source]
    assert run.data.tags[tracking.TAG_OPTUNA_TRIAL] == "0"
    assert run.data.metrics["val/best_epoch"] == best_epoch
    assert float(champion.tags[tracking.VERSION_ACCURACY_TAG]) == pytest.approx(curve[best_epoch])
    assert float(champion.tags["test_accuracy"]) == pytest.approx(rows[0]["test_acc"])
    assert rows[0]["test_acc"] < CHANCE
