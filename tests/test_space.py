"""tune/space.py and the search's plan, without Ray: every preset's space, bounds, the baseline trials,
absolute paths, and how free CPUs are shared out over trials."""


import pytest

from tune import runtime, search, space

# ----------------------------------------------------------------------------------------
# The space (no Ray).


def test_every_preset_has_a_space_that_contains_its_own_configuration():
    from lrra.config import preset
    from lrra.presets import PRESETS

    for name in PRESETS:
        cfg = preset(name)
        knobs = space.build_space(name, {}, set(), cfg)
        assert space.preset_point(knobs, cfg) is not None, name


def test_bounds_and_set_reshape_the_space():
    from lrra.config import preset

    cfg = preset("mnist")
    knobs = space.build_space("mnist", {"meta_lr": "0.01:0.5", "retention_order": "0,2", "kd_steps": [2, 8]},
                              {"w_adv"}, cfg)
    assert (knobs["meta_lr"].low, knobs["meta_lr"].high, knobs["meta_lr"].log) == (0.01, 0.5, True)
    assert knobs["retention_order"].choices == (0, 2)
    assert (knobs["kd_steps"].low, knobs["kd_steps"].high) == (2, 8)
    assert "w_adv" not in knobs  # fixed by --set
    assert space.space_from_json(space.space_to_json(knobs)) == knobs


def test_a_preset_without_memory_is_tried_with_its_generator_three_times_faster_then_slower():
    from lrra.config import preset

    cfg = preset("mnist")  # no memory, generator lr 3e-4, student clipped at norm 2
    preset_trial, faster, slower = space.baseline_points(space.build_space("mnist", {}, set(), cfg), cfg)
    assert (preset_trial["memory_capacity"], preset_trial["generator_lr"]) == (0, 3e-4)
    assert faster == {**preset_trial, "generator_lr": 9e-4}  # only the pace changes: clipping kept
    assert slower == {**preset_trial, "generator_lr": 1e-4}
    # A range without room above the preset: the slower one only.
    capped = space.build_space("mnist", {"generator_lr": "1e-4:5e-4"}, set(), cfg)
    assert [p["generator_lr"] for p in space.baseline_points(capped, cfg)] == [3e-4, 1e-4]
    # The generator's rate fixed by --set: no pace counterparts, so the memory one.
    fixed = space.build_space("mnist", {}, {"generator_lr"}, cfg)
    assert [p["memory_capacity"] for p in space.baseline_points(fixed, cfg)] == [0, space.RETENTION_MEMORY]


def test_without_room_for_a_slower_generator_the_second_trial_replays_a_memory_as_plain_kd():
    from lrra.config import preset

    cfg = preset("mnist")
    knobs = space.build_space("mnist", {"generator_lr": "2e-4:1e-3"}, set(), cfg)
    preset_trial, counterpart = space.baseline_points(knobs, cfg)
    assert preset_trial["retention_order"] == 2
    assert counterpart == {**preset_trial, "memory_capacity": space.RETENTION_MEMORY, "retention_order": 0}
    # Order 0 excluded by a bound too: the counterpart keeps the preset's order.
    knobs = space.build_space("mnist", {"retention_order": "1,2", "generator_lr": "2e-4:1e-3"}, set(), cfg)
    assert space.baseline_points(knobs, cfg)[1]["retention_order"] == 2
    # The digits preset's generator is at its range's slow end already: its counterpart has a memory.
    digits = preset("digits")
    _, memory = space.baseline_points(space.build_space("digits", {}, set(), digits), digits)
    assert (memory["memory_capacity"], memory["generator_lr"]) == (8, digits.generator_lr)
    # A preset with a memory is tried without one, at its own order.
    with_memory = preset("mnist", memory_capacity=10)
    _, without = space.baseline_points(space.build_space("mnist", {}, set(), with_memory), with_memory)
    assert (without["memory_capacity"], without["retention_order"]) == (0, 2)


def test_a_bound_that_excludes_the_preset_says_so(tmp_path, capsys):
    args = search.build_parser().parse_args(["--preset", "digits", "--bound", "student_lr=0.2:0.3",
                                             "--bound", "kd_steps=2:4"])
    plan = search.new_plan(args, str(tmp_path))
    err = capsys.readouterr().err
    note = [line for line in err.splitlines() if "preset's own configuration" in line]
    assert note == ["note: the bounds exclude the preset's own configuration (kd_steps=5 outside 2 .. 4 (integer), "
                    "student_lr=0.1 outside 0.2 .. 0.3 (log)): its trial and its counterparts are not run"]
    assert plan.points_to_evaluate == []


def test_a_plan_holds_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = search.build_parser().parse_args(["--preset", "digits", "--data-dir", "data", "--teacher", "t.pt"])
    config = search.new_plan(args, str(tmp_path)).config
    assert (config["data_dir"], config["teacher_path"]) == (str(tmp_path / "data"), str(tmp_path / "t.pt"))


@pytest.mark.parametrize("free_cpus, workers, samples, expected", [
    (2, 1, 8, 1.0),     # this machine: two single-thread trials at once
    (16, 1, 8, 2.0),    # a workstation: 8 trials of 2 threads
    (16, 2, 3, 2.0),    # 3 trials of 2 workers: 6 workers on 16 CPUs
    (3, 1, 2, 1.0),     # an odd CPU left over stays free rather than unevenly split
    (1, 2, 4, 1.0),     # fewer CPUs than one trial needs: the fit check reports it, not this
    (None, 1, 8, 1.0),  # GPUs (or an autoscaling cluster): a CPU per worker
])
def test_free_cpus_are_shared_out_over_the_trials_that_run_at_once(free_cpus, workers, samples, expected):
    assert runtime.share_cpus(free_cpus, workers, samples) == expected


def test_a_worker_never_gets_more_cpus_than_one_node_has():
    assert runtime.share_cpus(2, 1, 1, largest_node=1) == 1.0  # two 1-CPU nodes, one trial
    assert runtime.share_cpus(16, 1, 2, largest_node=4) == 4.0  # four 4-CPU nodes, two trials
    assert runtime.share_cpus(16, 1, 2, largest_node=16) == 8.0
