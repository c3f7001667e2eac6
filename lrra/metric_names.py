"""The report keys every layer shares, defined once.

The trainer writes them each epoch; Ray Train and Tune carry them; ASHA, Optuna and the champion
choice compare them; MLflow logs them under the same names.
"""

VALIDATION_METRIC = "val/student_acc"            # this epoch's student on validation: ASHA and Optuna read it
BEST_VALIDATION_METRIC = "val/best_student_acc"  # the best epoch's so far: the student kept, the champion
TEST_METRIC = "test/best_student_acc"            # the kept student on test: reported once, never compared
DIVERGED_KEY = "diverged"                        # 1 in the last report of a run whose loss went non-finite
RARE_CLASSES_METRIC = "synthetic/rare_classes"   # classes the epoch's generator hardly drew (the teacher's argmax)
