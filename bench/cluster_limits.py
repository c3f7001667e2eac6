"""What the central services of a cluster search cost per trial: ``python -m bench.cluster_limits``.

No Ray is started. Measures, on this machine:
- the Optuna study in SQLite: a TPE ask (the cifar100 space, multivariate) + tell, as the study
  grows, and one per-epoch ``report`` (what every trial epoch writes);
- the MLflow tracking server on the head (SQLite store): one epoch's metrics as one log_batch
  over HTTP, the request every trial's rank 0 sends each epoch;
- one checkpoint of the cifar100 preset (ResNet-18 student, generator, optimisers, best student,
  memory), the bytes every trial writes to the shared storage each ``checkpoint_every`` epochs.
docs/cluster.md ("Planning past one cluster") turns these into trials in flight.
"""

from __future__ import annotations

import io
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch

from bench.timing import timed
from lrra.config import preset
from lrra.models import build_classifier
from lrra.train import Distiller
from tune.space import build_space


def optuna_costs(folder: Path, trials: int) -> dict[str, float]:
    cfg = preset("cifar100")
    space = {name: knob.distribution() for name, knob in build_space("cifar100", {}, set(), cfg).items()}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{folder / 'optuna.db'}", direction="maximize",
                                sampler=optuna.samplers.TPESampler(multivariate=True, seed=0, n_startup_trials=10))
    ask_tell, report = [], []
    for number in range(trials):
        trial, ask_s = timed(lambda: study.ask(space))
        for epoch in range(3):
            report.append(timed(lambda trial=trial, epoch=epoch: trial.report(0.5 + 0.01 * epoch, epoch))[1])
        _, tell_s = timed(lambda trial=trial, number=number: study.tell(trial, 0.5 + 0.4 * (number % 7) / 7))
        ask_tell.append(ask_s + tell_s)
    return {"ask+tell ms, trials 10-20": 1e3 * statistics.median(ask_tell[10:20]),
            f"ask+tell ms, trials {trials - 10}-{trials}": 1e3 * statistics.median(ask_tell[-10:]),
            "report ms (median)": 1e3 * statistics.median(report)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def mlflow_costs(folder: Path, batches: int) -> dict[str, float]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "art"),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        client = MlflowClient(uri)
        deadline = time.monotonic() + 120
        while True:
            try:
                experiment = client.create_experiment("bench")
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        run_id = client.create_run(experiment).info.run_id
        names = [f"loss/m{i}" for i in range(20)]  # about what one epoch logs
        latencies = []
        for epoch in range(batches):
            metrics = [Metric(name, 0.1 * epoch, int(time.time() * 1000), epoch) for name in names]
            latencies.append(timed(lambda metrics=metrics: client.log_batch(run_id, metrics=metrics))[1])
        return {"log_batch of 20 metrics, ms (median)": 1e3 * statistics.median(latencies),
                "log_batch per s, one client": 1 / statistics.mean(latencies)}
    finally:
        server.terminate()
        server.wait(timeout=30)


def checkpoint_bytes() -> dict[str, float]:
    cfg = preset("cifar100", device="cpu")
    teacher = build_classifier(cfg.teacher_arch, cfg.num_classes, cfg.channels)
    distiller = Distiller(cfg, teacher, None, device=torch.device("cpu"))
    for _ in range(cfg.memory_capacity):  # a full memory, as after 50 epochs
        distiller.memory.push(torch.zeros(cfg.memory_push_size, cfg.channels, cfg.image_size, cfg.image_size))
    shared, own = io.BytesIO(), io.BytesIO()
    torch.save(distiller.state_dict(), shared)
    torch.save(distiller.rank_state_dict(), own)
    return {"state.pt MB": shared.tell() / 1e6, "rank_0.pt MB (full memory)": own.tell() / 1e6}


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        for name, figures in (("Optuna, SQLite", optuna_costs(Path(folder), 200)),
                              ("MLflow server, SQLite", mlflow_costs(Path(folder), 200)),
                              ("checkpoint, cifar100", checkpoint_bytes())):
            print(f"{name}: " + ", ".join(f"{key} {value:.3g}" for key, value in figures.items()))


if __name__ == "__main__":
    main()
