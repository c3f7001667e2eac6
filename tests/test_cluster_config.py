"""cluster.yaml passes Ray's own cluster-config checks, and keeps the layout the search relies on.

Ray's checks, as `ray up` runs them before touching AWS: the JSON schema (ray/autoscaler/ray-schema.json),
prepare_config (merging the AWS provider's defaults.yaml) and validate_config. No AWS API is called,
no Ray is started. Each check is also shown to reject a broken copy, so it can fail.
"""

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

from lrra.library_hooks import ray_prepare_cluster_config, ray_validate_cluster_config
from tune import head
from tune.cluster import DRIVER_RESOURCE

ROOT = Path(__file__).resolve().parent.parent

SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def ray_checks(config: dict) -> dict:
    """What `ray up` checks before it calls the provider; returns the prepared config."""
    jsonschema.validate(config, SCHEMA)
    prepared = ray_prepare_cluster_config(copy.deepcopy(config))
    ray_validate_cluster_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_schema_and_config_preparation():
    prepared = ray_checks(load())
    assert prepared["provider"]["type"] == "aws"
    # The AWS defaults were merged in (a field cluster.yaml leaves out) and kept our values.
    assert prepared["idle_timeout_minutes"] == load()["idle_timeout_minutes"]
    assert prepared["available_node_types"]["gpu_1"]["max_workers"] == 8


def break_resource_type(config):
    config["available_node_types"]["gpu_1"]["resources"]["GPU"] = 0.5  # Ray wants integers


def break_unknown_key(config):
    config["max_nodes"] = 4  # a typo of max_workers


def break_head_type(config):
    config["head_node_type"] = "cpu_head"


def break_min_workers(config):
    config["available_node_types"]["gpu_4"]["min_workers"] = config["max_workers"] + 1


def break_missing_resources(config):
    del config["available_node_types"]["gpu_4"]["resources"]


@pytest.mark.parametrize("breaks", [break_resource_type, break_unknown_key, break_head_type, break_min_workers,
                                    break_missing_resources])
def test_a_broken_copy_fails_rays_checks(breaks):
    config = load()
    breaks(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_checks(config)


def test_the_head_hosts_the_drivers_and_the_workers_are_gpu_nodes():
    config = load()
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get(DRIVER_RESOURCE, 0) >= 1
    workers = {name: spec for name, spec in types.items() if name != config["head_node_type"]}
    gpus = sorted(spec["resources"].get("GPU", 0) for spec in workers.values())
    assert gpus[0] == 1 and gpus[-1] > 1  # a single-GPU type and a multi-GPU type
    for name, spec in workers.items():
        assert DRIVER_RESOURCE not in spec["resources"], name
        assert spec["resources"].get("CPU", 0) >= spec["resources"]["GPU"], name  # a CPU per GPU worker
        assert 0 <= spec["min_workers"] <= spec["max_workers"], name
        # Workers reach the shared storage through an instance profile, never keys.
        assert "IamInstanceProfile" in spec["node_config"], name
    assert not any(k in json.dumps(config) for k in ("aws_access_key_id", "AWS_SECRET_ACCESS_KEY"))


def test_images_and_installs_follow_the_pinned_ray_and_the_checkout():
    config = load()
    for image in (config["docker"]["head_image"], config["docker"]["worker_image"]):
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py311"), image
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"ray[tune,train,default]>=2.60,<2.61"' in pyproject and ray.__version__.startswith("2.60.")
    assert config["file_mounts"] == {"~/lrra": "."}
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        assert any("pip install" in c and "-e ~/lrra" in c for c in commands)


def test_the_head_commands_write_settings_that_tune_head_accepts():
    config = load()
    settings = [c for c in config["head_start_ray_commands"] if "tune/head.py settings" in c]
    assert len(settings) == 1  # the one place the shared storage is set
    argv = shlex.split(settings[0].split("tune/head.py", 1)[1])
    with pytest.raises(SystemExit) as parse_only:  # parse with head.py's own parser, run nothing
        head.main([*argv, "--help"])
    assert parse_only.value.code == 0
    storage = argv[argv.index("--storage-path") + 1]
    assert storage.startswith("s3://")
    assert any("tune/head.py mlflow" in c for c in config["head_start_ray_commands"])
    assert any("--autoscaling-config=~/ray_bootstrap_config.yaml" in c for c in config["head_start_ray_commands"])


def test_the_fake_autoscaling_config_of_the_tests_passes_rays_monitor_checks():
    """Ray's monitor validates tests/fake_autoscaling.yaml as it stands (no defaults are merged)."""
    ray_validate_cluster_config(yaml.safe_load((ROOT / "tests" / "fake_autoscaling.yaml").read_text()))
