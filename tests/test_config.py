"""Every invalid config value gets one clear error naming the field, the value and what is allowed."""

import pytest

from lrra.config import ConfigError, LRRAConfig, describe, parse_assignments, preset
from lrra.config_resume import check_resumable
from lrra.fault_injection import ENV, NO_FAULTS, Faults
from lrra.presets import PRESETS

BAD_VALUES = [
    ("student_lr", -0.1, "must be > 0"),
    ("generator_lr", 0.0, "must be > 0"),
    ("meta_lr", -1.0, ">= 0"),
    ("batch_size", 0, ">= 1"),
    ("epochs", 0, ">= 1"),
    ("kd_steps", 0, ">= 1"),
    ("gen_steps", -1, ">= 0"),
    ("memory_capacity", -1, ">= 0"),
    ("memory_push_every", 0, ">= 1"),
    ("memory_push_size", 10_000, "<= batch_size"),
    ("retention_order", 3, "0 (replay only)"),
    ("teacher_arch", "vgg99", "one of"),
    ("student_arch", "nope", "one of"),
    ("image_size", 6, ">= 8"),
    ("teacher_arch", "torchvision:resnet99", "torchvision has no model 'resnet99'"),
    ("student_arch", "torchvision:", "names no model"),
    ("teacher_format", "onnx", "one of"),
    ("input_mean", "0.5,0.5", "one number per channel: channels=1, got 2"),
    ("input_mean", "0.5,x", "comma-separated numbers"),
    ("student_ema", 1.0, "[0, 1)"),
    ("synthetic_shift", 16, "[0, 16)"),
    ("generator_output", "sigmoid", "one of ('auto', 'batchnorm', 'pixels')"),
    ("generator_warmup_steps", -1, ">= 0"),
    ("generator_warmup_lr", 0.0, "> 0"),
    ("channels", 2, "1 or 3"),
    ("num_classes", 1, ">= 2"),
    ("student_momentum", 1.0, "[0, 1)"),
    ("w_ie", -5.0, ">= 0"),
    ("student_lr", float("nan"), "finite"),
    ("device", "tpu", "'auto'"),
    ("retention_weight", -0.5, ">= 0"),
    ("retention_weight", float("inf"), "finite"),
    ("retention_warmup_epochs", -1, ">= 0"),
    ("replay_batch_size", -8, ">= 0"),
]


@pytest.mark.parametrize(("name", "value", "allowed"), BAD_VALUES)
def test_invalid_field_is_named_with_value_and_rule(name, value, allowed):
    with pytest.raises(ConfigError) as err:
        preset("mnist", **{name: value})
    message = str(err.value)
    assert f"'{name}'" in message and repr(value) in message and allowed in message


def test_unknown_preset_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match="unknown preset 'imagenet-1k'.*cifar10"):
        preset("imagenet-1k")


def test_unknown_field_is_refused():
    with pytest.raises(ConfigError, match="unknown config field.*'metalr'"):
        preset("mnist", metalr=0.1)


def test_cli_strings_are_coerced_to_field_types():
    cfg = preset("mnist", meta_lr="0.5", memory_capacity="0", bf16="true")
    assert cfg.meta_lr == 0.5 and cfg.memory_capacity == 0 and cfg.bf16 is True
    with pytest.raises(ConfigError, match="'epochs' = '2.5'.*type int"):
        preset("mnist", epochs="2.5")
    with pytest.raises(ConfigError, match="field=value"):
        parse_assignments(["meta_lr"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_and_round_trips(name):
    cfg = preset(name)
    assert cfg.preset == name
    assert LRRAConfig.from_dict(cfg.to_dict()) == cfg


def test_reference_preset_matches_the_authors_configuration():
    cfg = preset("cifar100")
    assert (cfg.teacher_arch, cfg.student_arch, cfg.num_classes) == ("resnet34", "resnet18", 100)
    assert (cfg.batch_size, cfg.latent_dim, cfg.gen_steps, cfg.kd_steps, cfg.iters_per_epoch) == (512, 1000, 1, 10, 72)
    assert (cfg.meta_lr, cfg.memory_capacity, cfg.memory_push_every, cfg.memory_push_size) == (0.9, 10, 5, 64)


def test_every_field_has_a_docstring():
    docs = describe()
    assert set(docs) == set(LRRAConfig.__dataclass_fields__)
    assert all(doc.strip() for doc in docs.values())


def test_replay_batch_size_and_replay_batches_are_not_set_together():
    with pytest.raises(ConfigError, match="'replay_batch_size' = 32 .*not both"):
        preset("mnist", replay_batch_size=32, replay_batches=2)
    assert preset("mnist", replay_batch_size=32).replay_batch_size == 32


@pytest.mark.parametrize(("name", "value"), [("retention_weight", 0.3), ("retention_warmup_epochs", 2),
                                             ("replay_batch_size", 64)])
def test_retention_knobs_cannot_change_on_resume(name, value):
    with pytest.raises(ConfigError, match=f"cannot resume: {name} "):
        check_resumable(preset("mnist"), preset("mnist", **{name: value}), epochs_done=1)


def test_timm_architectures_say_how_to_install_timm_when_it_is_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        preset("mnist", teacher_arch="timm:resnet18")
    assert "'teacher_arch'" in str(err.value) and "pip install 'lrra[timm]'" in str(err.value)


def test_the_normalisation_is_one_number_per_channel_and_a_positive_std():
    cfg = preset("mnist", channels=3, input_mean="0.485, 0.456,0.406", input_std="0.229,0.224,0.225",
                 dataset="CIFAR10")
    assert cfg.input_mean == "0.485, 0.456,0.406"
    with pytest.raises(ConfigError, match="'input_std'.*must be > 0"):
        preset("mnist", input_mean="0.5", input_std="0")
    with pytest.raises(ConfigError, match="'input_std' = ''.*set together"):
        preset("mnist", input_mean="0.5")


# ----------------------------------------------------------------------------------------
# The tests' fault switches: from the environment, never from the configuration.


def test_faults_come_from_the_environment_only():
    assert Faults.from_environment({}) == NO_FAULTS
    assert Faults.from_environment({ENV: "fault_at_epoch=1, nan_at_epoch=3"}) == Faults(fault_at_epoch=1,
                                                                                          nan_at_epoch=3)
    assert "nan_at_epoch" not in preset("digits").to_dict()
    with pytest.raises(ConfigError, match="unknown config field"):
        preset("digits", nan_at_epoch=2)


@pytest.mark.parametrize("text", ["nan_at_epoch", "nan_at_epoch=-2", "nan_at_epoch=x", "oops=1"])
def test_a_bad_fault_switch_names_the_variable(text):
    with pytest.raises(ConfigError, match=f"{ENV}=.*expected NAME=EPOCH"):
        Faults.from_environment({ENV: text})


def test_a_config_written_with_the_old_fault_fields_still_loads():
    old = {**preset("digits").to_dict(), "fault_at_epoch": -1, "nan_at_epoch": -1}  # checkpoints, search plans
    assert LRRAConfig.from_dict(old) == preset("digits")


# ----------------------------------------------------------------------------------------
# The flags every command shares, and `python -m lrra fields`.


def test_the_commands_share_one_reading_of_the_subject_flags():
    import argparse

    from lrra.cli_args import add_subject_arguments, flag_fields, set_fields

    parser = argparse.ArgumentParser()
    add_subject_arguments(parser, preset_default="mnist", set_help="x", teacher_help="t", epochs_help="e")
    args = parser.parse_args(["--teacher", "t.pt", "--data-dir", "d", "--epochs", "7", "--set", "meta_lr=0.3",
                              "--set", "seed=2"])
    assert set_fields(args) == {"meta_lr": "0.3", "seed": "2"}
    assert flag_fields(args) == {"teacher_path": "t.pt", "data_dir": "d", "epochs": "7"}
    assert flag_fields(args, epochs_field="teacher_epochs")["teacher_epochs"] == "7"


def test_fields_lists_every_field_with_the_presets_value(capsys):
    from lrra.cli import main

    assert main(["fields", "--preset", "digits", "--set", "meta_lr=0.3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(describe())
    meta_lr = next(line for line in lines if line.startswith("meta_lr "))
    assert "0.3" in meta_lr and " ".join(describe()["meta_lr"].split()) in meta_lr
    assert main(["fields", "--set", "bogus=1"]) == 2


@pytest.mark.parametrize("command", [["distill"], ["search"], ["compare"]])
def test_help_shows_every_config_fields_docstring(command, capsys):
    from lrra.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # the docstrings are wrapped
    for name, doc in describe().items():
        assert f"{name} {' '.join(doc.split())}" in help_text, name


def test_one_lrra_command_runs_the_search_comparison_and_head_commands(capsys):
    from lrra.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    for command in ("teacher", "check", "distill", "search", "compare", "eval", "export", "fields", "cluster-head"):
        assert f"    {command} " in listed, command
    # the tune commands get their own arguments: a bad one is their parser's error, not lrra's
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--num-samples", "many"])
    assert exit_.value.code == 2 and "usage: python tune/search.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cluster-head", "--help"])
    assert "settings" in capsys.readouterr().out
