"""Writes dashboards/lrra.json, the LRRA Grafana dashboard: ``python dashboards/build_dashboard.py``.

The dashboard is plain Grafana JSON built from the panel list below; the JSON is committed, and
tests/test_dashboards.py fails when it is stale. Every panel and query reads the datasource
variable ``$datasource``; the ``search`` and ``trial`` variables pick what it shows, so one
dashboard serves any search (a run outside a search is the search ``distill``). Metric names come
from lrra/live_metrics.py (ours) or are Ray's own node and GPU metrics.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "lrra.json"
UID = "lrra-search"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RUN = 'search=~"$search", trial=~"$trial"'          # a worker metric's selector
SEARCH = 'search=~"$search"'                         # a search driver metric's selector

# What each query's series carry, for the tests: WORKER and SEARCH queries are ours (the labels
# they must carry), NODE queries are Ray's own node metrics and GPU ones Ray's GPU metrics, which
# a machine without a GPU does not export.
WORKER, SEARCH_LEVEL, NODE, GPU = "worker", "search", "node", "gpu"


@dataclass
class Query:
    expr: str
    legend: str
    scope: str = WORKER


@dataclass
class Panel:
    title: str
    queries: list[Query]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    description: str = ""


def worker(metric: str, legend: str = "{{trial}} rank {{rank}}", extra: str = "") -> Query:
    return Query(f"ray_{metric}{{{RUN}{extra}}}", legend)


ROWS: list[tuple[str, list[Panel]]] = [
    ("Search overview", [
        Panel("Trials by state", [Query(f"ray_lrra_search_trials{{{SEARCH}}}", "{{state}}", SEARCH_LEVEL)],
              kind="stat", width=16, description="trials running, completed, stopped early (ASHA, time budget) "
                                                 "and failed, from the search's driver"),
        Panel("Best validation accuracy so far",
              [Query(f"ray_lrra_search_best_val_accuracy_ratio{{{SEARCH}}}", "{{search}}", SEARCH_LEVEL)],
              unit="percentunit", kind="stat", width=8),
    ]),
    ("Accuracy", [
        Panel("Validation accuracy per trial", [worker("lrra_val_accuracy_ratio", "{{trial}}")], unit="percentunit",
              description="the student's top-1 validation accuracy after each epoch (rank 0 evaluates)"),
        Panel("Best validation accuracy and epochs per trial",
              [worker("lrra_best_val_accuracy_ratio", "best {{trial}}"),
               worker("lrra_epochs_completed", "epochs {{trial}} rank {{rank}}")]),
    ]),
    ("Losses", [
        Panel("Generator loss terms", [worker("lrra_loss", "{{trial}} rank {{rank}} {{term}}",
                                              ', term=~"generator|gen_.*"')],
              description="the generator's objective and its unweighted terms, epoch means per rank"),
        Panel("Student loss terms", [worker("lrra_loss", "{{trial}} rank {{rank}} {{term}}", ', term=~"student_.*"')],
              description="the student's objective, KD, acquisition (meta-train) and retention (meta-test) losses"),
    ]),
    ("Throughput per worker", [
        Panel("Student steps/s", [worker("lrra_student_steps_per_second")], unit="ops", width=8),
        Panel("Synthetic images/s", [worker("lrra_images_per_second")], width=8),
        Panel("Time of one step", [worker("lrra_generator_step_seconds", "generator {{trial}} rank {{rank}}"),
                                   worker("lrra_student_step_seconds", "student (meta) {{trial}} rank {{rank}}")],
              unit="s", width=8),
    ]),
    ("Replay memory", [
        Panel("Memory fill (pushes held / capacity)", [worker("lrra_memory_fill_ratio")], unit="percentunit"),
        Panel("Images in memory", [worker("lrra_memory_images")]),
    ]),
    ("Nodes and GPUs (Ray's metrics)", [
        Panel("CPU utilisation per node", [Query("ray_node_cpu_utilization", "{{instance}}", NODE)],
              unit="percent", width=6),
        Panel("GPU utilisation", [Query("ray_node_gpus_utilization", "{{instance}} GPU {{GpuIndex}}", GPU)],
              unit="percent", width=6),
        Panel("GPU memory used", [Query("ray_node_gram_used * 1024 * 1024", "{{instance}} GPU {{GpuIndex}}", GPU)],
              unit="bytes", width=6),
        Panel("Device memory per worker", [Query(f"ray_lrra_device_memory_allocated_bytes{{{RUN}}}",
                                                 "{{trial}} rank {{rank}}", GPU)],
              unit="bytes", width=6, description="memory held by tensors on each worker's GPU (from the workers)"),
    ]),
]


def variables() -> list[dict]:
    def query(name: str, label_query: str, label: str) -> dict:
        return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
                "query": {"query": label_query, "refId": f"{name}-values"}, "definition": label_query,
                "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
                "current": {"text": "All", "value": "$__all"}}

    return [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0},
        query("search", "label_values(ray_lrra_epochs_completed, search)", "search"),
        query("trial", 'label_values(ray_lrra_epochs_completed{search=~"$search"}, trial)', "trial"),
    ]


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    height = 5 if panel.kind == "stat" else 8
    return {
        "id": panel_id, "type": panel.kind, "title": panel.title, "description": panel.description,
        "datasource": DATASOURCE, "gridPos": {"h": height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": [{"datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend, "refId": chr(65 + i)}
                    for i, q in enumerate(panel.queries)],
    }


def dashboard() -> dict:
    panels, panel_id, y = [], 1, 0
    for title, row in ROWS:
        panels.append({"id": panel_id, "type": "row", "title": title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        panel_id, y, x, row_height = panel_id + 1, y + 1, 0, 0
        for panel in row:
            if x + panel.width > 24:
                x, y = 0, y + row_height
            panels.append(panel_json(panel, panel_id, x, y))
            row_height = max(row_height, panels[-1]["gridPos"]["h"])
            panel_id, x = panel_id + 1, x + panel.width
        y += row_height
    return {
        "uid": UID, "title": "LRRA search", "tags": ["lrra", "ray"], "timezone": "browser", "schemaVersion": 39,
        "editable": True, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "description": "A running LRRA search: its trials, their students' accuracy and losses, each worker's "
                       "speed, the replay memory, and Ray's node and GPU metrics.",
        "templating": {"list": variables()}, "panels": panels, "annotations": {"list": []}, "links": [],
    }


def queries() -> list[Query]:
    """Every query of the dashboard, with its scope (for the tests)."""
    return [q for _, row in ROWS for panel in row for q in panel.queries]


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}", file=sys.stderr)
