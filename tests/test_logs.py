"""The commands' lines go through the standard logging module, one logger per layer, and look as
they always did: bare messages on standard error."""

from __future__ import annotations

import logging

import pytest

from lrra import logs


@pytest.fixture
def restore_logging():
    levels = {logger: logger.level for logger in (logs.core, logs.search)}
    yield
    for logger, level in levels.items():
        logger.setLevel(level)
    logs._install_handler()


def test_each_layer_prints_bare_lines_on_stderr(capsys):
    for layer, name in ((logs.core, "lrra"), (logs.ray_train, "lrra.ray_train"), (logs.search, "lrra.search"),
                        (logs.compare, "lrra.compare")):
        assert layer.name == name
        layer.info(f"a line from {name}")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"a line from {name}" for name in
                                         ("lrra", "lrra.ray_train", "lrra.search", "lrra.compare")]


def test_a_layer_is_quietened_as_any_logger_is(capsys, restore_logging):
    logs.search.setLevel(logging.WARNING)
    logs.search.info("progress")
    logs.search.warning("a warning")
    logs.core.info("teacher")
    assert capsys.readouterr().err.splitlines() == ["a warning", "teacher"]


def test_in_a_process_whose_logging_ray_sets_up_the_lines_go_to_its_handlers(capsys, caplog, restore_logging):
    logs.defer_to_process_logging()
    with caplog.at_level(logging.INFO):
        logs.ray_train.info("epoch 1/2")
    assert capsys.readouterr().err == ""  # not printed a second time beside the host's handlers
    assert "epoch 1/2" in caplog.messages
