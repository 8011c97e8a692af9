"""Meta-learning mode (Meta-RIMs): parameter groups, the inner/outer phases, task schedules, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import evaluate
import policies
import train
from agents.config import ConfigError, load_config
from agents.meta import MetaPPO, TaskSchedule, split_parameters
from agents.rollout import RolloutStats, collect_rollout, start_rollouts
from agents.trainer import Trainer
from policies import BRIMs, RIMs, ThalNet
from policies.checkpoint import load_checkpoint

META_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "meta" / "doorkey-sizes.yaml"
DK5, DK6 = "MiniGrid-DoorKey-5x5-v0", "MiniGrid-DoorKey-6x6-v0"
# The shipped meta config shrunk to a few seconds: 16 frames per rollout, cycles of 2 rollouts,
# and one Adam step per update (so an update's largest parameter change is its learning rate).
# One torch thread: these tiny batches run several times faster so on a busy 2-core machine.
# Whole 8-step sequences (the shipped 16-step chunks would not divide 8 steps).
TINY = ["env.n_envs=2", "algo.n_steps=8", "algo.num_minibatches=1", "algo.n_epochs=1", "algo.seq_len=null",
        "core.module_size=8", "meta.inner_updates=1", "log.progress_bar=false", "torch_threads=1"]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # torch_threads=1 sets the process-wide count; later tests of the session get theirs back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def meta_trainer(run_dir: Path, *overrides: str) -> Trainer:
    return Trainer(load_config(META_CONFIG, [*TINY, *overrides]), run_dir)


def snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- parameter groups -----------------------------------------------------------------------------
def _cores() -> list[tuple[str, nn.Module]]:
    cores = [("rims-lstm", lambda: RIMs(12, num_modules=3, module_size=8, k_active=2)),
             ("rims-gru-2heads", lambda: RIMs(12, num_modules=3, module_size=8, k_active=2, cell="gru",
                                              num_input_heads=2)),
             ("brims", lambda: BRIMs(12, layers=[{"num_modules": 3, "module_size": 8, "k_active": 2}] * 2))]
    cores += [(f"thalnet-{reading}", lambda reading=reading: ThalNet(12, num_modules=3, module_size=16,
                                                                     center_size_per_module=8, reading=reading))
              for reading in ("weight_norm", "linear", "fast_softmax", "fast_gaussian")]
    return cores


@pytest.mark.parametrize("make_core", [make for _, make in _cores()], ids=[name for name, _ in _cores()])
def test_parameter_groups_cover_every_core_parameter_exactly_once(make_core) -> None:
    core = make_core()
    groups = core.parameter_groups()
    assert set(groups) == {"modules", "attention"}
    assert groups["modules"] and groups["attention"]
    listed = [id(p) for group in groups.values() for p in group]
    assert len(listed) == len(set(listed)), "a parameter is in both groups (or twice in one)"
    assert set(listed) == {id(p) for p in core.parameters()}, "a parameter is in no group"


def test_policy_split_puts_encoder_and_heads_where_the_config_says(tmp_path: Path) -> None:
    policy = meta_trainer(tmp_path).policy
    core_groups = policy.core.parameter_groups()
    outside = {id(p) for name, p in policy.named_parameters() if not name.startswith("core.")}
    for reverse in (False, True):
        for place in ("fast", "slow"):
            fast, slow = split_parameters(policy, reverse=reverse, encoder_heads=place)
            fast_ids, slow_ids = {id(p) for p in fast}, {id(p) for p in slow}
            assert not fast_ids & slow_ids and fast_ids | slow_ids == {id(p) for p in policy.parameters()}
            fast_core = core_groups["attention" if reverse else "modules"]
            assert {id(p) for p in fast_core} <= fast_ids
            assert outside <= (fast_ids if place == "fast" else slow_ids)


# -- the phases -----------------------------------------------------------------------------------
@pytest.mark.parametrize("reverse", [False, True], ids=["modules-fast", "reversed"])
def test_inner_updates_change_only_fast_and_outer_only_slow(tmp_path: Path, reverse: bool) -> None:
    trainer = meta_trainer(tmp_path, "meta.inner_updates=2", f"meta.reverse={str(reverse).lower()}",
                           "meta.fast_lr=0.01", "meta.slow_lr=0.001")
    meta: MetaPPO = trainer.updater
    groups = trainer.policy.core.parameter_groups()
    fast_core, slow_core = groups["modules"], groups["attention"]
    if reverse:
        fast_core, slow_core = slow_core, fast_core
    assert {id(p) for p in fast_core} <= {id(p) for p in meta.fast_params}
    assert {id(p) for p in slow_core} <= {id(p) for p in meta.slow_params}

    # Each group's optimiser holds exactly that group, at its own learning rate.
    for updater, params, lr in ((meta.fast, meta.fast_params, 0.01), (meta.slow, meta.slow_params, 0.001)):
        assert [group["lr"] for group in updater.optimizer.param_groups] == [lr]
        assert [id(p) for group in updater.optimizer.param_groups for p in group["params"]] == [id(p) for p in params]

    state = start_rollouts(trainer.policy, trainer.venv)
    for phase, changed, unchanged, lr, first_step in (("inner", meta.fast_params, meta.slow_params, 0.01, True),
                                                      ("inner", meta.fast_params, meta.slow_params, 0.01, False),
                                                      ("outer", meta.slow_params, meta.fast_params, 0.001, True)):
        assert meta.phase == phase
        state, _ = collect_rollout(trainer.policy, trainer.venv, trainer.storage, state, 0.99, 0.95)
        before_changed, before_unchanged = snapshot(changed), snapshot(unchanged)
        stats = meta.update(trainer.storage)
        for p, old in zip(unchanged, before_unchanged, strict=True):
            assert torch.equal(p, old), f"{phase} update changed a parameter of the other group"
        assert all(not torch.equal(p, old) for p, old in zip(changed, before_changed, strict=True)), \
            f"{phase} update left a parameter of its group unchanged"
        if first_step:
            # An optimiser's first Adam step moves each element by lr * |g| / (|g| + eps): at most the
            # learning rate, and about it for the largest gradients. (Later steps may exceed it slightly.)
            largest = max(float((p.detach() - old).abs().max())
                          for p, old in zip(changed, before_changed, strict=True))
            assert lr * 0.9 < largest <= lr * 1.0001
        assert stats["lr"] == lr
        norms = (stats["meta/fast_update_norm"], stats["meta/slow_update_norm"])
        assert (norms[0] > 0, norms[1] > 0) == ((True, False) if phase == "inner" else (False, True))
    assert meta.phase == "inner" and meta.outer_updates == 1
    assert all(p.requires_grad for p in trainer.policy.parameters())


def test_meta_mode_with_an_lstm_core_is_a_clear_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for core in ("lstm", "gru"):
        code = train.main(["--config", str(META_CONFIG), f"core.name={core}", "log.progress_bar=false",
                           "--run-dir", str(tmp_path / core)])
        err = capsys.readouterr().err
        assert code == 2
        assert f"core.name={core!r}" in err and "meta_ppo" in err
        assert "Traceback" not in err and err.count("\n") == 1
        assert not (tmp_path / core).exists(), "nothing may start before the config is rejected"
    # Built directly (bypassing the config), the update rule refuses too.
    rims_trainer = meta_trainer(tmp_path / "rims")
    lstm_config = load_config(None, ["core.name=lstm", "core.hidden_size=16"])
    lstm_policy = Trainer(lstm_config, tmp_path / "lstm-policy").policy
    with pytest.raises(ConfigError, match=r"core\.name='lstm'"):
        MetaPPO(lstm_policy, rims_trainer.config["algo"], rims_trainer.updater.schedule, 1e-3, 1e-4, 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["meta.tasks=null"], "exactly one of meta.tasks"),
        (["meta.suite=doorkey"], "exactly one of meta.tasks"),
        (["meta.tasks=[MiniGrid-DoorKey-5x5-v9]"], "meta.tasks[0]"),
        (["meta.tasks=[]"], "meta.tasks must be a non-empty list"),
        (["meta.task_schedule=curriculum"], "meta.curriculum_frames"),
        (["meta.task_schedule=shuffle"], "meta.task_schedule must be one of"),
        (["meta.fast_lr=0"], "meta.fast_lr must be > 0"),
        (["algo.lr=0.001"], "unknown config key 'algo.lr'"),
        (["algo.name=ppo", "algo.lr=0.001"], "config section 'meta' does not apply"),
        # Settings that were silently ignored or misread, or failed with a traceback:
        (["meta.curriculum_frames=1000"], "meta.curriculum_frames applies only with meta.task_schedule='curriculum'"),
        ([f"meta.tasks=[{{id: {DK5}, name: 5}}]"], "meta.tasks[0].name must be a string, got 5"),
        ([f"meta.tasks=[{DK5}, {{id: {DK6}, mission: 'no'}}]"],
         "meta.tasks[1].mission must be true or false, got 'no'"),
        ([f"meta.tasks=[{{id: {DK5}, frame_stack: 0}}]"], "meta.tasks[0].frame_stack must be > 0, got 0"),
        # Rates the float32 update cannot hold: 1e-50 rounds to 0 (the group never trains), 1e39 to inf.
        (["meta.fast_lr=1e-50"], "meta.fast_lr must be > 0 and representable in float32"),
        (["meta.slow_lr=1e39"], "meta.slow_lr must be > 0 and representable in float32"),
        # A task whose options fail only at its first reset, or at an assert with no message: refused
        # before training, naming the task's key and why (the schedule might reach it hours in).
        ([f"meta.tasks=[{DK5}, {{id: {DK6}, env_kwargs: {{size: 3}}}}]"],
         "meta.tasks[1] (MiniGrid-DoorKey-6x6-v0 with {'env_kwargs': {'size': 3}}) cannot be built: low >= high"),
        ([f"meta.tasks=[{DK5}, {{id: {DK6}, env_kwargs: {{size: 2}}}}]"],
         "meta.tasks[1] (MiniGrid-DoorKey-6x6-v0 with {'env_kwargs': {'size': 2}}) cannot be built: assert "),
        ([f"meta.tasks=[{{id: {DK5}, level_seeds: [99999999999999999999]}}]"], "below 2**63"),
    ],
)
def test_bad_meta_settings_are_rejected_before_training(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        meta_trainer(tmp_path, *overrides)
    assert message in str(info.value)


def test_a_meta_run_stopped_by_non_finite_values_is_told_what_it_can_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """meta_ppo has no algo.lr, and no rate may change on --resume (an exact resume would repeat the
    same updates): the message names the meta rates and a new run, not "lower algo.lr, then resume"."""
    code = train.main(["--config", str(META_CONFIG), *TINY, "meta.inner_updates=2", "algo.anneal_lr=false",
                       "meta.slow_lr=1e30", "log.checkpoint_interval_frames=16", "total_frames=96",
                       "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Resuming would repeat the same updates: start a new run with a lower meta.fast_lr or meta.slow_lr or " \
           "algo.max_grad_norm, from these weights with `init_from=" in err
    assert "algo.lr" not in err and "--resume" not in err and "Traceback" not in err


def test_schedule_settings_are_checked_with_the_config() -> None:
    # At load time, as every other config error: a study or a sweep refuses it before any run starts.
    with pytest.raises(ConfigError, match="meta.curriculum_return applies only with meta.task_schedule='curriculum'"):
        load_config("configs/meta/doorkey-sizes-multitask.yaml", ["meta.curriculum_return=0.5"])


def test_suite_gives_the_tasks_and_tasks_may_carry_options(tmp_path: Path) -> None:
    trainer = meta_trainer(tmp_path, "meta.tasks=null", "meta.suite=doorkey")
    assert trainer.updater.schedule.tasks == [(DK5, trainer.updater.schedule.tasks[0][1])]
    trainer = meta_trainer(tmp_path, f"meta.tasks=[{DK5}, {{id: {DK6}, name: six, max_episode_steps: '5e1'}}]")
    schedule = trainer.updater.schedule
    assert schedule.names == ["DoorKey-5x5", "six"]
    # A number spelled as text is read as the env section reads it.
    assert schedule.tasks[0][1]["max_episode_steps"] is None and schedule.tasks[1][1]["max_episode_steps"] == 50


# -- task schedules -------------------------------------------------------------------------------
def test_sample_draws_every_task_from_the_list_reproducibly() -> None:
    tasks = [(f"task-{i}", {}) for i in range(3)]
    draws = []
    for _ in range(2):
        schedule = TaskSchedule(tasks, ["a", "b", "c"], "sample", seed=5)
        sequence = [schedule.index]
        for cycle in range(60):
            schedule.end_cycle(frames=cycle * 10)
            sequence.append(schedule.index)
        draws.append(sequence)
    assert draws[0] == draws[1]
    assert set(draws[0]) == {0, 1, 2}


def test_curriculum_advances_on_its_frame_budget_and_stays_on_the_last_task() -> None:
    schedule = TaskSchedule([("a", {}), ("b", {}), ("c", {})], ["a", "b", "c"], "curriculum", curriculum_frames=100)
    seen = []
    for frames in (50, 100, 150, 200, 250, 300, 1000):
        schedule.end_cycle(frames)
        seen.append(schedule.index)
    assert seen == [0, 1, 1, 2, 2, 2, 2]
    assert schedule.task_started_frames == 200


def test_curriculum_advances_when_the_return_window_reaches_the_threshold() -> None:
    schedule = TaskSchedule([("a", {}), ("b", {})], ["a", "b"], "curriculum", curriculum_return=0.5, return_window=3)
    schedule.observe(RolloutStats(episodes=[{"r": 0.9, "l": 5.0}]))
    schedule.end_cycle(10)
    assert schedule.index == 0, "one lucky episode is not a full window"
    schedule.observe(RolloutStats(episodes=[{"r": 0.0, "l": 5.0}, {"r": 0.2, "l": 5.0}]))
    schedule.end_cycle(20)
    assert schedule.index == 0, "mean 0.37 is below the threshold"
    schedule.observe(RolloutStats(episodes=[{"r": 0.9, "l": 5.0}, {"r": 0.9, "l": 5.0}]))
    schedule.end_cycle(30)
    assert schedule.index == 1
    assert schedule.stats()["meta/return/a"] == pytest.approx((0.2 + 0.9 + 0.9) / 3)
    assert schedule.stats()["meta/return_episodes/a"] == 3, "the window is full: 3 of the 5 episodes"
    assert "meta/return/b" not in schedule.stats(), "no episode has ended on b yet"


def test_curriculum_run_switches_the_envs_to_the_next_task(tmp_path: Path) -> None:
    trainer = meta_trainer(tmp_path, "meta.task_schedule=curriculum", "meta.curriculum_frames=32", "total_frames=96")
    assert trainer.task[0] == DK5 and trainer.venv.envs[0].spec.id == DK5
    trainer.run()
    assert trainer.task[0] == DK6 and trainer.venv.envs[0].spec.id == DK6
    # Cycles of 2 rollouts of 16 frames: the task changes after the cycle that reaches 32 frames on DK5.
    assert [row["meta/task_index"] for row in rows(tmp_path)] == [0, 0, 1, 1, 1, 1]


def test_a_task_switch_parks_the_envs_so_that_their_episodes_continue_when_the_task_returns(tmp_path: Path) -> None:
    # Switching tasks every few short rollouts must not cut episodes: DoorKey's run to 250-640 steps,
    # and a run that restarted them at every switch could only learn from the short ones.
    # Starts on DK5 (the curriculum's first task); the script then decides the switches.
    trainer = meta_trainer(tmp_path, "total_frames=64", "meta.task_schedule=curriculum",
                           "meta.curriculum_frames=1000")  # 4 rollouts of 8 steps, 2 envs
    first_venv = trainer.venv
    script = [DK6, DK5, DK5, DK6]  # the task asked for after each update
    seen = []

    def next_task(frames, rollout_stats):
        steps = [env.unwrapped.step_count for env in trainer.venv.envs]
        seen.append((trainer.task[0], trainer.venv, steps))
        return (script[len(seen) - 1], dict(trainer.task[1]))

    trainer.updater.next_task = next_task
    trainer.run()
    assert [task for task, _, _ in seen] == [DK5, DK6, DK5, DK5]
    assert [venv is first_venv for _, venv, _ in seen] == [True, False, True, True]
    # DK5's episodes ran 8 steps, waited parked while DK6 ran, then went on: 16 and 24 steps, not
    # 8 again (no episode of these untrained 2 envs ends within 24 steps of DoorKey-5x5's 250).
    assert [steps for _, _, steps in seen] == [[8, 8], [8, 8], [16, 16], [24, 24]]
    # Now on DK6 again: its parked envs came back as they were (8 steps, its one rollout), and DK5's are parked.
    assert trainer.task[0] == DK6 and trainer.venv is seen[1][1]
    assert [env.unwrapped.step_count for env in trainer.venv.envs] == [8, 8]
    assert [venv for venv, _ in trainer.parked_tasks.values()] == [first_venv]


def test_beyond_max_parked_tasks_the_least_recently_run_task_envs_are_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agents.trainer

    monkeypatch.setattr(agents.trainer, "MAX_PARKED_TASKS", 0)
    trainer = meta_trainer(tmp_path, "total_frames=32", "meta.task_schedule=curriculum", "meta.curriculum_frames=1000")
    closed = []
    monkeypatch.setattr(trainer.venv, "close", lambda: closed.append(True))
    trainer.updater.next_task = lambda frames, stats: (DK6, dict(trainer.task[1]))
    trainer.run()
    assert trainer.task[0] == DK6 and trainer.parked_tasks == {} and closed == [True]


# -- command line, checkpoint, resume ---------------------------------------------------------------
def test_tiny_meta_run_from_the_command_line_writes_a_loadable_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    # Episodes of 4 steps, so that every 8-step rollout ends some (DoorKey's own limit is 250 steps).
    short = f"meta.tasks=[{{id: {DK5}, max_episode_steps: 4}}, {{id: {DK6}, max_episode_steps: 4}}]"
    assert train.main(["--config", str(META_CONFIG), *TINY, short, "total_frames=64", "--run-dir", str(run_dir)]) == 0
    # The first line names the task distribution, not only env.id (the first task).
    assert "meta_ppo on 2 tasks (DoorKey-5x5, DoorKey-6x6)" in capsys.readouterr().out.splitlines()[0]
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    assert checkpoint["frames"] == 64 and checkpoint["config"]["algo"]["name"] == "meta_ppo"
    assert set(checkpoint["updater"]) >= {"fast", "slow", "step", "schedule"}
    logged = rows(run_dir)
    assert [row["meta/phase"] for row in logged] == [0, 1, 0, 1]
    for key in ("train/policy_loss", "train/value_loss", "train/entropy", "train/approx_kl", "meta/task_index",
                "meta/fast_update_norm", "meta/slow_update_norm"):
        assert all(key in row for row in logged), key
    # Per-task returns: the schedule sees a rollout's episodes after its update, so every row but the first
    # has the mean return of the tasks run so far, and over how many episodes.
    assert all(row["rollout/episodes"] > 0 for row in logged)
    assert not any(key.startswith("meta/return/") for key in logged[0])
    for row in logged[1:]:
        returns = {key.removeprefix("meta/return/"): value for key, value in row.items()
                   if key.startswith("meta/return/")}
        assert returns and all(0.0 <= value <= 1.0 for value in returns.values()), row
        assert all(row[f"meta/return_episodes/{name}"] > 0 for name in returns), row
    # load_policy (the notebook one-liner) accepts it: the weights, and the task the run ended on.
    policy = policies.load_policy(run_dir / "checkpoint.pt")
    assert policy.core_name == "rims" and policy.env_id == checkpoint["env"]["id"] in (DK5, DK6)
    for key, value in policy.model.state_dict().items():
        assert torch.equal(value, checkpoint["policy"]["state_dict"][key]), key
    # evaluate.py accepts it too, on the held-out size.
    results = tmp_path / "eval.json"
    assert evaluate.main([str(run_dir), "--env", "MiniGrid-DoorKey-8x8-v0", "--episodes", "2", "--n-envs", "2",
                          "--max-episode-steps", "20", "--no-progress", "--json", str(results)]) == 0
    assert "DoorKey-8x8" in results.read_text()


def test_resume_of_a_meta_run_restores_phase_and_schedule(tmp_path: Path) -> None:
    # 160 frames: the task parked at the stop (DoorKey-6x6, the first task) comes back at 112 frames,
    # and its envs must go on with the episodes they were in, as in the uninterrupted run.
    extra = ("total_frames=160", "meta.task_schedule=sample")
    whole = meta_trainer(tmp_path / "whole", *extra)
    whole.run()
    split = meta_trainer(tmp_path / "split", *extra)
    split.run(stop_at_frames=48)  # 3 rollouts: mid-cycle, the next update is an outer one
    saved = split.updater.state_dict()
    assert split.parked_tasks, "a task should be parked at the stop"
    resumed = Trainer.resume(tmp_path / "split")
    assert list(resumed.parked_tasks) == list(split.parked_tasks)
    meta: MetaPPO = resumed.updater
    assert resumed.frames == 48 and meta.phase == "outer" and meta.step == saved["step"] == 1
    assert meta.schedule.index == saved["schedule"]["index"] and resumed.task == meta.schedule.current
    assert torch.equal(meta.schedule.generator.get_state(), saved["schedule"]["generator"])
    assert meta.fast.optimizer.state_dict()["state"].keys() == split.updater.fast.optimizer.state_dict()["state"].keys()
    resumed.run()
    a, b = rows(tmp_path / "whole"), rows(tmp_path / "split")
    assert [r["meta/task_index"] for r in a] == [r["meta/task_index"] for r in b]
    assert len({r["meta/task_index"] for r in a}) == 2, "the sampled task should change in this run"
    final_a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    final_b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for key, value in final_a["policy"]["state_dict"].items():
        assert torch.equal(value, final_b["policy"]["state_dict"][key]), key
    assert final_a["env"] == final_b["env"]


def test_multitask_ppo_trains_an_lstm_on_the_same_tasks(tmp_path: Path) -> None:
    config = load_config(None, ["core.name=lstm", "core.hidden_size=16", "algo.name=multitask_ppo",
                                f"meta.tasks=[{DK5}, {DK6}]", "meta.task_schedule=curriculum",
                                "meta.curriculum_frames=16", "meta.rollouts_per_task=2", *TINY[:4], "torch_threads=1",
                                "log.progress_bar=false", "total_frames=64"])
    trainer = Trainer(config, tmp_path)
    trainer.run()
    assert [row["meta/task_index"] for row in rows(tmp_path)] == [0, 0, 1, 1]
    assert trainer.task[0] == DK6


@pytest.mark.parametrize("algo", ["meta_ppo", "multitask_ppo"])
def test_a_task_list_whose_spaces_differ_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], algo: str
) -> None:
    # mission: true turns the observation into a Dict (image + mission tokens): a policy built for
    # env.id's image-only space could not read it. Found before the first rollout, one line, exit 2.
    overrides = [*TINY, f"meta.tasks=[{DK5}, {{id: {DK6}, mission: true}}]", "meta.task_schedule=curriculum",
                 "meta.curriculum_frames=16", "total_frames=64"]
    config = ["--config", str(META_CONFIG)]
    if algo == "multitask_ppo":  # the embedded default (RIMs PPO) switched to the multi-task baseline
        config = []
        overrides = [o for o in overrides if not o.startswith("meta.inner_updates")] + ["algo.name=multitask_ppo"]
    code = train.main([*config, *overrides, "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "meta.tasks[1] (MiniGrid-DoorKey-6x6-v0 with {'mission': True}) has observation space Dict" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()
