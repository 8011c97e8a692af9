"""Do the shipped configs learn on every seed? Frames to a threshold and the return at the end of the budget.

    python benchmarks/learning.py --configs default configs/minigrid/doorkey-*-ppo.yaml --seeds 1-10
    python benchmarks/learning.py --configs default --seeds 100-104 --set algo.anneal_lr=true --tag anneal
    MODULAR_MEMORY_NATIVE=0 python benchmarks/learning.py --configs default --seeds 1-10 --tag python-engine
    python benchmarks/learning.py --configs default --seeds 1-5 --nproc 2 --jobs 1 --tag 2proc   # torchrun

Every (config, seed) is an ordinary ``python train.py`` run in its own directory under
``--out`` (default ``benchmarks/out/learning``), ``--jobs`` of them at a time (one torch
thread each). Running the same command again skips finished runs and resumes interrupted
ones (``--resume``), so a long sweep can be stopped and continued: Ctrl-C, ``kill`` (SIGTERM) or a
hangup asks the running runs to checkpoint and exit, and the sweep exits 130, 143 or 129. ``default`` names the
embedded default config (a bare ``python train.py``). Every config is checked with the overrides its runs get
before any run starts (with ``--report-only`` too): a mistake is one message and exit 2, and nothing is created.
A run folder (named by the config file's name and ``--set``) that holds a run of another config, made before
the file was edited, is refused the same way rather than resumed or reported as the new config's.

Per seed it prints the frames at which the mean return of the last 100 episodes first
reached ``--threshold`` (with at least 100 episodes finished), the mean return of the
last 100 episodes at the end of the budget, and whether the run stayed learned (final >=
``--final``); per config, the count of seeds that reached the threshold and stayed. A
multi-task config (``meta_ppo``, ``multitask_ppo``) counts as reaching the threshold when every
training task's mean return (over that task's last ``meta.return_window`` episodes) has reached
it, and its final return is the lowest task's (each task's is printed beside it). It also draws every
run's return curve, a panel per config and a line per seed (dashed while unfinished), into
``OUT/curves/<config>+<config>....png`` (``--no-plot`` to skip): a run that learned, collapsed and
learned again passes the table's test, and only the curve shows it.

``--study STUDY`` (a study's folder, file or name) reads that study's runs instead (``<folder>/runs/<model>/seed_<s>``
for the models and seeds of its study file, what ``python study.py run`` makes; other folders there are named and
left out) and prints the same table, and draws the curves into
``OUT/curves/study-<study>.png``, training nothing: whether and when each of a study's runs learned its
training env, which the study's report (built on its evaluations) does not say.

    python benchmarks/learning.py --study studies/memorys13-generalization --threshold 0.8

Tune on seeds >= 100; report on seeds 1-10.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as `python benchmarks/learning.py` from a source checkout
from agents.config import (  # noqa: E402
    ConfigError,
    check_config_env_id,
    load_config,
    locate_config,
    parse_overrides,
)
from agents.executors import stop_exit_status, stop_signals_recorded  # noqa: E402
from envs.names import short_env_name  # noqa: E402

WINDOW = 100  # episodes in the mean return: the trainer's default log.return_window (a run's own is read from it)
# A sweep's options and their defaults (none of them applies to --study).
SWEEP_DEFAULTS: dict[str, object] = {"configs": ["default"], "seeds": ["1-10"], "set": [], "tag": "", "jobs": 2,
                                     "nproc": 1}
MAX_SEEDS = 10_000  # per range: more is a typo (1-1000000), not a sweep
# A tag is part of a folder name (OUT/<config>-<tag>) and of the curves' file name: a slash would nest folders, a
# leading dot hide them ("..": leave OUT), and other characters make names no shell line shows plainly.
TAG = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class Job:
    """One training run of a sweep: a config (or the embedded default) at one seed."""

    label: str
    config: str | None  # a YAML path, or None for the embedded default
    overrides: tuple[str, ...]
    seed: int
    run_dir: Path
    nproc: int = 1  # processes training the one run (torchrun when > 1)


def finite_float(text: str) -> float:
    """``--threshold`` and ``--final``: a number the returns are compared with. NaN compares false with every
    return and an infinity is never (or always) reached, so either would turn the table into a silent verdict."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def plain_tag(text: str) -> str:
    """``--tag``: a plain name (see :data:`TAG`), so the runs and curves stay where the sweep says, under OUT."""
    if TAG.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain name: use letters, digits, '.', '_' and '-' "
                                         "(up to 100), not starting with '.'")
    return text


def run_overrides(seed: int, overrides: Sequence[str]) -> list[str]:
    """The overrides train.py gets for a new run of a sweep: the sweep's own, then the user's ``--set``."""
    return [f"seed={seed}", "log.progress_bar=false", "torch_threads=1", *overrides]


def check_config(config: str | None, overrides: Sequence[str], seeds: Sequence[int]) -> None:
    """Resolve ``config`` (a YAML path, None for the embedded default) with the overrides its runs get, as
    train.py does before it trains, so that a mistake is one message here, not a failed run per seed.

    Only ``seed`` differs between the runs, and its check is a range: the lowest and highest seeds cover them all.

    :raises ConfigError: for a config or override train.py would refuse (the message names it).
    """
    if "seed" in parse_overrides(overrides):
        raise ConfigError("--set seed=... would train every run on that one seed; give the seeds with --seeds")
    for seed in sorted({min(seeds), max(seeds)}):
        resolved = load_config(config, run_overrides(seed, overrides))
    check_config_env_id(resolved)


def parse_seeds(items: list[str]) -> list[int]:
    """``["1-3", "7"]`` -> ``[1, 2, 3, 7]``."""
    seeds: list[int] = []
    for item in items:
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if match is None:
            raise ValueError(f"--seeds: {item!r} is not a seed or a range like 1-10")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first or last - first >= MAX_SEEDS:
            raise ValueError(f"--seeds: {item!r} is empty or longer than {MAX_SEEDS} seeds")
        repeated = sorted(set(seeds) & set(range(first, last + 1)))
        if repeated:  # a seed twice would be trained in one folder twice and counted twice
            raise ValueError(f"--seeds: seed {repeated[0]} is given twice")
        seeds.extend(range(first, last + 1))
    return seeds


def read_rows(run_dir: Path) -> list[dict]:
    """The metrics rows of a run; a partial last line (a killed write) is dropped."""
    path = run_dir / "metrics.jsonl"
    rows = []
    if path.is_file():
        # A byte that is no UTF-8 (a damaged file) ends the rows there, as a partial line does.
        for line in path.read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


TASK_RETURN = "meta/return/"  # a multi-task run's (meta_ppo, multitask_ppo) per-task mean return
TASK_EPISODES = "meta/return_episodes/"  # ... and how many episodes that mean is over


def training_tasks(rows: list[dict]) -> list[str]:
    """A multi-task run's training tasks (sorted), as its rows name them; empty for a one-task run."""
    return sorted({key[len(TASK_RETURN):] for row in rows for key in row if key.startswith(TASK_RETURN)})


def task_returns(rows: list[dict], window: int | None = None) -> list[dict[str, float]] | None:
    """Per update of a multi-task run, each training task's latest mean return (over its last
    ``meta.return_window`` episodes), an empty dict until every task has one; None for a one-task run.

    :param window: count a task's mean only once it is over this many episodes (the run's
        ``meta.return_window``). The first episodes to end on a task a curriculum has just reached
        are its short, successful ones, so a mean over a few of them overstates the policy. Rows
        logged before the episode counts existed are taken as they are.
    """
    tasks = training_tasks(rows)
    if not tasks:
        return None
    latest: dict[str, float] = {}
    out = []
    for row in rows:
        for task in tasks:
            episodes = row.get(TASK_EPISODES + task)
            if row.get(TASK_RETURN + task) is not None and (window is None or episodes is None or episodes >= window):
                latest[task] = row[TASK_RETURN + task]
        out.append({name: latest[name] for name in sorted(latest)} if len(latest) == len(tasks) else {})
    return out


def return_curve(rows: list[dict], task_window: int | None = None, window: int = WINDOW) -> list[tuple[int, float]]:
    """``(frames, mean return)`` at every update from the first with a full window of ``window`` finished
    episodes (the run's ``log.return_window``, over which the trainer logs its mean); for a multi-task run,
    the lowest training task's mean return from the first update at which every task has one over a full
    window of ``task_window`` episodes (``meta.return_window``)."""
    per_task = task_returns(rows, task_window)
    if per_task is not None:
        return [(int(row["frames"]), min(tasks.values())) for row, tasks in zip(rows, per_task) if tasks]
    curve, episodes = [], 0
    for row in rows:
        episodes += int(row.get("rollout/episodes") or 0)
        mean = row.get("rollout/ep_return_mean")
        if episodes >= window and mean is not None:
            curve.append((int(row["frames"]), float(mean)))
    return curve


def frames_to_threshold(rows: list[dict], threshold: float, task_window: int | None = None,
                        window: int = WINDOW) -> int | None:
    """Frames at the first point of :func:`return_curve` that reaches ``threshold``, or None."""
    return next((frames for frames, mean in return_curve(rows, task_window, window) if mean >= threshold), None)


def windows(config: dict) -> tuple[int | None, int]:
    """A run's episode windows from its resolved config: a multi-task run's per-task ``meta.return_window``
    (None for one task) and ``log.return_window``, the one its logged mean return is over."""
    task_window = (config.get("meta") or {}).get("return_window")
    return task_window, int((config.get("log") or {}).get("return_window") or WINDOW)


def final_return(rows: list[dict]) -> float:
    """The mean return of the last 100 episodes at the last update (0.0 before any episode ended);
    for a multi-task run, the lowest of its training tasks' mean returns."""
    per_task = task_returns(rows)
    if per_task is not None:
        return min(per_task[-1].values()) if per_task[-1] else 0.0
    return next((row["rollout/ep_return_mean"] for row in reversed(rows)
                 if row.get("rollout/ep_return_mean") is not None), 0.0)


def read_run(job: Job) -> tuple[list[dict], dict | None]:
    """The run's metrics rows and its resolved config (None until it exists), each file read once, so a
    report or plot of a run that is still writing describes one moment of it."""
    import yaml

    config_path = job.run_dir / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path} is not valid YAML ({type(exc).__name__}); the run's files are damaged") from None
    if config is not None and not (isinstance(config, dict) and isinstance(config.get("total_frames"), int)):
        raise ValueError(f"{config_path} is not a run's resolved config (a mapping with total_frames)")
    rows = read_rows(job.run_dir)
    bad = next((i for i, row in enumerate(rows, 1) if not (isinstance(row, dict) and isinstance(row.get("frames"), int))),
               None)
    if bad is not None:
        raise ValueError(f"{job.run_dir / 'metrics.jsonl'} line {bad} is not a metrics row of train.py (no frames); the "
                         "run's files are damaged")
    return rows, config


def finished(rows: list[dict], config: dict | None) -> bool:
    """A run is finished when its last logged update reached the budget in its resolved config."""
    return bool(rows) and config is not None and rows[-1]["frames"] >= int(config["total_frames"])


def is_finished(job: Job) -> bool:
    """Whether ``job``'s run is :func:`finished`, read from its files."""
    return finished(*read_run(job))


def command(job: Job) -> list[str]:
    """The train.py command line that starts the run, or resumes it if it has a checkpoint.

    With ``job.nproc > 1`` the run is one agent trained by that many processes under torchrun
    (``--standalone`` picks a free rendezvous port, so two sweeps never clash).
    """
    launcher = [sys.executable]
    if job.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={job.nproc}"]
    if (job.run_dir / "checkpoint.pt").is_file():
        return [*launcher, "train.py", "--resume", str(job.run_dir)]
    config = ["--config", job.config] if job.config else []
    return [*launcher, "train.py", *config, "--run-dir", str(job.run_dir), *run_overrides(job.seed, job.overrides)]


def check_existing_runs(jobs: list[Job]) -> str | None:
    """Why a job's folder cannot be continued or reported as that job's (it holds a run of another config: the
    config file changed since, or another file of the same name and --set wrote it), or None.

    The folder name comes from the config file's name and --set alone, so without this check such a run was
    resumed with its old config, or counted as finished, and reported under the new one.
    """
    import yaml

    from agents.config import load_written_yaml
    from agents.study import config_differences, config_hash

    for job in jobs:
        saved = job.run_dir / "config.yaml"
        if not saved.is_file():
            continue
        try:
            written = load_written_yaml(saved.read_text())
        except (OSError, ValueError, yaml.YAMLError) as exc:
            return f"{saved} cannot be read ({exc}); move {job.run_dir} away to run it again"
        planned = load_config(job.config, run_overrides(job.seed, job.overrides))
        if not isinstance(written, dict) or config_hash(written) != config_hash(planned):
            changed = config_differences(written, planned) if isinstance(written, dict) else []
            detail = f" (differs in {', '.join(changed[:4])})" if changed else ""
            return (f"{job.run_dir} was trained with another config than {job.config or 'the default'} "
                    f"{'with --set ' + ' '.join(job.overrides) + ' ' if job.overrides else ''}gives now{detail}; "
                    "refusing to continue or report it as this config's: give --tag a new name, or move those runs "
                    "away")
    return None


def run_all(jobs: list[Job], parallel: int) -> list[Job]:
    """Run the unfinished jobs, ``parallel`` at a time, each as its own train.py process; return those
    whose train.py failed (a bad override, a broken config: their logs say why)."""
    todo = [job for job in jobs if not is_finished(job)]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already finished; {len(todo)} to run, {parallel} at a time",
          flush=True)
    running: list[tuple[Job, subprocess.Popen, float]] = []
    failed: list[Job] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Ctrl-C, SIGTERM and SIGHUP stop the sweep: a plain `kill` would otherwise end this process and leave
    # its train.py runs training unsupervised, holding their run locks against the next call. The signals
    # are only recorded and this loop checks them between steps, so none can cut a launch short.
    with stop_signals_recorded() as received:
        while (todo or running) and not received:
            while todo and len(running) < parallel and not received:
                job = todo.pop(0)
                job.run_dir.parent.mkdir(parents=True, exist_ok=True)
                # Its own session: a terminal's Ctrl-C or hangup reaches only this driver, which stops
                # every run the same way (below) instead of some runs seeing the signal and some not.
                with (job.run_dir.parent / f"{job.run_dir.name}.log").open("a") as log:
                    process = subprocess.Popen(command(job), cwd=REPO, stdout=log, stderr=log, env=env,
                                               start_new_session=True)
                running.append((job, process, time.time()))
            deadline = time.time() + 2
            while time.time() < deadline and not received:
                time.sleep(0.1)
            for entry in list(running):
                job, process, started = entry
                if process.poll() is None:
                    continue
                running.remove(entry)
                status = "done" if process.returncode == 0 else f"exit code {process.returncode} (see its .log)"
                if process.returncode != 0:
                    failed.append(job)
                print(f"  {job.label} seed {job.seed}: {status} in {time.time() - started:.0f} s", flush=True)
        if not received:
            return failed
        for _, process, _ in running:
            process.terminate()  # train.py checkpoints on SIGTERM; the next call resumes
        print(f"stopping: asked {len(running)} running run(s) to checkpoint and exit (again to abort them)",
              flush=True)
        while any(process.poll() is None for _, process, _ in running):
            if len(received) > 1:  # a second Ctrl-C / SIGTERM: do not wait for the checkpoints
                for _, process, _ in running:
                    process.kill()
                    process.wait()
                print("aborted the running runs (their last checkpoints are intact)", flush=True)
                break
            time.sleep(0.1)
        print("stopped; run the same command again to continue", flush=True)
        raise SystemExit(stop_exit_status(received[-1]))


def binomial_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact) interval of a success rate from ``successes`` of ``trials``: how little a
    count of seeds such as 1 of 5 pins down (0.01-0.72). (0, 1) for no trials.

    Each end solves a binomial tail equal to ``(1 - confidence) / 2`` by bisection (no scipy needed).
    """
    tail = (1 - confidence) / 2

    def at_least(k: int, p: float) -> float:  # P(X >= k) for X ~ Binomial(trials, p): increasing in p
        return sum(math.comb(trials, i) * p**i * (1 - p) ** (trials - i) for i in range(k, trials + 1))

    def solve(k: int, target: float) -> float:  # the p at which at_least(k, p) = target
        low, high = 0.0, 1.0
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if at_least(k, middle) < target else (low, middle)
        return (low + high) / 2

    if trials == 0:
        return 0.0, 1.0
    lower = 0.0 if successes == 0 else solve(successes, tail)  # P(X >= successes) = tail
    upper = 1.0 if successes == trials else solve(successes + 1, 1 - tail)  # P(X <= successes) = tail
    return lower, upper


RunFiles = dict[Path, tuple[list[dict], dict | None]]  # run folder -> read_run's (rows, config)


def read_runs(jobs: list[Job]) -> RunFiles:
    """:func:`read_run` of every job, once: the table and the figure then describe the same moment of runs
    still writing, and each file is read once."""
    return {job.run_dir: read_run(job) for job in jobs}


def report(jobs: list[Job], threshold: float, final_bar: float, runs: RunFiles | None = None) -> str:
    """Per seed and per config: frames to threshold, final return, and the count of seeds that made it.

    :param runs: :func:`read_runs` of ``jobs`` (read here when None)."""
    runs = read_runs(jobs) if runs is None else runs
    lines = [f"{'config':<28}{'seed':>5}{'budget':>9}{'to ' + str(threshold):>10}{'final':>8}{'fps':>7}  verdict"]
    by_label: dict[str, list[Job]] = {}
    for job in jobs:
        by_label.setdefault(job.label, []).append(job)
    for label, group in by_label.items():
        made, reached, done, short, hits = 0, 0, 0, 0, []
        for job in group:
            rows, config = runs[job.run_dir]
            if not finished(rows, config):
                state = "unfinished" if job.run_dir.is_dir() else "not started"
                lines.append(f"{label:<28}{job.seed:>5}{'':>9}{state:>10}")
                continue
            task_window, window = windows(config)
            episodes = sum(int(row.get("rollout/episodes") or 0) for row in rows)
            if task_window is None and episodes < window:  # its mean was never over a full window: no verdict
                lines.append(f"{label:<28}{job.seed:>5}{config['total_frames']:>9}{'-':>10}{'':>8}{'':>7}  too short "
                             f"({episodes} episodes, fewer than the {window} of its window; not counted)")
                short += 1
                continue
            done += 1
            hit, final = frames_to_threshold(rows, threshold, task_window, window), final_return(rows)
            fps = statistics.median([row["time/fps"] for row in rows if isinstance(row.get("time/fps"), (int, float))]
                                    or [math.nan])
            reached += hit is not None
            ok = hit is not None and final >= final_bar
            made += ok
            hits.append(hit if hit is not None else float("inf"))
            verdict = "learned" if ok else ("collapsed" if hit is not None else "not reached")
            per_task = (task_returns(rows) or [{}])[-1]
            lines.append(f"{label:<28}{job.seed:>5}{config['total_frames']:>9}{hit if hit else '-':>10}{final:>8.3f}"
                         f"{fps:>7.0f}  {verdict}"
                         + (" (" + ", ".join(f"{t} {r:.3f}" for t, r in per_task.items()) + ")" if per_task else ""))
        median = statistics.median(hits) if hits else float("inf")
        low, high = binomial_interval(made, done)
        unfinished = f" ({len(group) - done - short} unfinished, not counted)" if done + short < len(group) else ""
        lines.append(f"{label:<28}  reached {threshold} on {reached}/{done}, reached and still >= {final_bar} "
                     f"at the end on {made}/{done} (95% CI of the rate {low:.2f}-{high:.2f}){unfinished}; "
                     f"median frames to {threshold} (a run that never reached it counts as the slowest): {median}")
    return "\n".join(lines)


def study_jobs(study: str) -> tuple[Path, list[Job]]:
    """A study's folder and its planned runs (``runs/<model>/seed_<s>`` for each model and seed of its study file,
    made by ``study.py run``) as jobs to report on, models in name order and seeds in number order. A planned
    run not started yet is reported as such; a run folder outside the plan (a model since removed, another
    seed) is named on stderr and left out, so the counts are those of the study's own seeds.

    :param study: the study's folder, its study file or its name (under ``studies/``), as ``study.py report``
        takes them.
    :raises ValueError: for a folder that is not a study's, or a study with no runs yet (the message says which).
    """
    from agents.study import RUNS_FOLDER, STUDY_COPY, StudyError, load_study_dir, run_dir, study_dir, unplanned_runs

    try:
        folder = study_dir(study)
        if not (folder / STUDY_COPY).is_file():
            raise ValueError(f"no study folder {folder} (`python study.py run <study file>` makes one under "
                             "studies/<study name>/, with the study's copy of its file in it)")
        planned = load_study_dir(folder)
    except StudyError as exc:
        raise ValueError(str(exc)) from None
    runs = folder / RUNS_FOLDER
    if not runs.is_dir() or not any(runs.glob("*/seed_*")):
        raise ValueError(f"the study in {folder} has no runs yet ({RUNS_FOLDER}/<model>/seed_<s>)")
    jobs = [Job(model.label, None, (), seed, run_dir(folder, model.label, seed))
            for model in sorted(planned.models, key=lambda m: m.label) for seed in sorted(planned.seeds)]
    stray = [path for path in unplanned_runs(planned, folder) if path.is_relative_to(runs)]  # not fine-tuning's
    if stray:
        print(f"note: {len(stray)} folder(s) in {runs} are not runs of the study's models and seeds, left out: "
              f"{', '.join(str(path.relative_to(runs)) for path in stray[:5])}{' ...' if len(stray) > 5 else ''}",
              file=sys.stderr)
    return folder, jobs


def curves_path(out: Path, labels: list[str]) -> Path:
    """Where the sweep's curves go: ``OUT/curves/<label>+<label>....png``, one file per set of configs (and
    tags), which a rerun of the same command rewrites; a long list is shortened and told apart by a hash."""
    name = "+".join(labels)
    if len(name) > 100:
        name = f"{labels[0]}+{len(labels) - 1}-more-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return out / "curves" / f"{name}.png"


def panel_title(label: str, env_ids: set[str], tasks: set[str]) -> str:
    """A curves panel's title: the config's label and what its runs trained on, where they share it (a tag alone
    does not say it): a multi-task panel's tasks (its curve is the lowest task's; ``env.id`` is only the first),
    else the one ``env.id`` of its runs, else the label alone."""
    if tasks:
        trained_on = " + ".join(sorted(tasks))
    elif len(env_ids) == 1 and "" not in env_ids:
        trained_on = short_env_name(next(iter(env_ids)))
    else:
        return label
    # A panel is ~4 inches wide: a longer title goes on two lines rather than into the next panel's.
    return f"{label} on {trained_on}" if len(label) + len(trained_on) <= 44 else f"{label}\non {trained_on}"


def plot_curves(jobs: list[Job], threshold: float, path: Path, runs: RunFiles | None = None) -> Path | None:
    """Draw every run's :func:`return_curve`, one panel per config, a line per seed (dashed while the run is
    unfinished), the threshold as a grey line and a dot where a seed first reached it; None if no run has a
    point yet. Written atomically, so a sweep watched while it runs never shows a half-written file.

    :param runs: :func:`read_runs` of ``jobs`` (read here when None)."""
    runs = read_runs(jobs) if runs is None else runs
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from agents.plots import save_figure_atomic

    by_label: dict[str, list[Job]] = {}
    for job in jobs:
        by_label.setdefault(job.label, []).append(job)
    columns = min(len(by_label), 4)
    rows_of_panels = -(-len(by_label) // columns)
    fig = Figure(figsize=(4.2 * columns, 3.2 * rows_of_panels), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows_of_panels, columns, squeeze=False, sharey=True).ravel()
    drawn = False
    for ax, (label, group) in zip(axes, by_label.items()):
        env_ids: set[str] = set()
        tasks: set[str] = set()  # a multi-task run's training tasks (env.id is only its first)
        window_sizes: set[int] = set()
        for i, job in enumerate(group):
            rows, config = runs[job.run_dir]
            env_ids.add(str(((config or {}).get("env") or {}).get("id", "")))
            task_window, window = windows(config or {})
            window_sizes.add(window)
            tasks.update(training_tasks(rows))
            curve = return_curve(rows, task_window, window)
            if not curve:
                continue
            frames, means = zip(*curve)
            ax.plot([f / 1000 for f in frames], means, color=f"C{i % 10}", linewidth=1.2,
                    linestyle="-" if finished(rows, config) else "--", label=f"seed {job.seed}")
            hit = next((f for f, m in curve if m >= threshold), None)
            if hit is not None:
                ax.plot(hit / 1000, threshold, "o", color=f"C{i % 10}", markersize=4)
            drawn = True
        ax.axhline(threshold, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(panel_title(label, env_ids, tasks), fontsize=9)
        ax.set_xlabel("frames (thousands)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            # Below the panel, not on it: inside, it hid the low curves (the runs that never learned) at the end.
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=5, frameon=False)
        ax.set_ylabel("lowest task's mean return" if tasks else "mean return, last log.return_window episodes"
                      if window_sizes - {WINDOW} else f"mean return, last {WINDOW} episodes", fontsize=8)
    for ax in axes[len(by_label):]:
        ax.set_visible(False)
    return save_figure_atomic(fig, path) if drawn else None


def main() -> None:
    """Run (or, with --report-only, only read) the sweep, or read a --study's runs, and print the table and curves.

    Exit status: 0 done, 1 some runs failed (their logs say why), 2 bad input (one message, nothing created),
    129/130/143 stopped by a hangup, Ctrl-C or SIGTERM (run the same command again to continue).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # A sweep's options: None when not given, so that --study can refuse them (defaults: SWEEP_DEFAULTS).
    parser.add_argument("--configs", nargs="+",
                        help="config files, or 'default' for the embedded default (default: default)")
    parser.add_argument("--seeds", nargs="+", help="seeds or ranges, e.g. 1-10 100 (default 1-10)")
    parser.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="overrides for every config")
    parser.add_argument("--tag", type=plain_tag, help="name of this variant (runs go to OUT/<config>[-tag]/seed_<s>)")
    parser.add_argument("--jobs", type=int, help="runs at a time (default 2, one per core here)")
    parser.add_argument("--nproc", type=int,
                        help="processes per run: > 1 trains each run with torchrun (total_frames counts all of them)")
    parser.add_argument("--threshold", type=finite_float, default=0.9)
    parser.add_argument("--final", type=finite_float, default=None,
                        help="return the run must keep at the end of the budget (default: the threshold - 0.05; "
                             "MultiRoom-N2-S4's best possible return is ~0.85, so 0.8 and 0.75 there)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "learning")
    parser.add_argument("--report-only", action="store_true", help="print the table from finished runs, train nothing")
    parser.add_argument("--no-plot", action="store_true",
                        help="do not draw the return curves (by default OUT/curves/<configs>.png, rewritten each time)")
    parser.add_argument("--study", metavar="STUDY",
                        help="report on a study's runs (its folder, study file or name under studies/; the runs "
                             "are <folder>/runs/<model>/seed_<s>) instead of a sweep's, training nothing; curves go "
                             "to OUT/curves/study-<study>.png")
    args = parser.parse_args()
    given = [name for name in SWEEP_DEFAULTS if getattr(args, name) is not None]
    if args.study is not None and given:
        parser.error(f"--study reads a study's runs as they are: {', '.join('--' + name for name in given)} "
                     "do not apply")
    for name, default in SWEEP_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.nproc < 1 or args.jobs < 1:
        parser.error("--nproc and --jobs must be at least 1")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as exc:
        parser.error(str(exc))
    if args.report_only and args.no_plot:  # reads the runs there, writes nothing
        if args.out.exists() and not args.out.is_dir():
            parser.error(f"--out {args.out} is a file, not a folder")
    else:
        from _common import check_out_folder  # benchmarks/ is on sys.path when this runs as a script

        check_out_folder(parser, args.out)

    if args.study is not None:
        try:
            folder, jobs = study_jobs(args.study)
        except ValueError as exc:
            parser.error(str(exc))
        failed: list[Job] = []
        curves = args.out / "curves" / f"study-{folder.resolve().name}.png"
    else:
        jobs = []
        # Variants with other overrides get their own directories, so no run is mixed with another.
        suffix = args.tag or (hashlib.sha1(" ".join(args.set).encode()).hexdigest()[:6] if args.set else "")
        labels: dict[str, tuple[str, str | None]] = {}  # a label (its runs' folder) -> the config named, its file
        for config in args.configs:
            # The file the user named, found as train.py finds it (here, else in the package), passed on as an
            # absolute path: the runs start in the repository, which may not be where the user is. A file found
            # nowhere stays as named, for load_config to say where it looked.
            found = None if config == "default" else locate_config(config)
            path = None if found is None else str(found.resolve()) if found.is_file() else config
            # Every config is checked, with the overrides its runs get, before any run starts (or, with
            # --report-only, before its runs are read as that config's): one message, nothing created.
            try:
                check_config(path, args.set, seeds)
            except ConfigError as exc:
                print(f"error: {config}: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            name = "default" if path is None else Path(config).stem
            label = f"{name}-{suffix}" if suffix else name
            if label in (".", ".."):  # a file named ...yaml: its runs would go to OUT/.. itself
                parser.error(f"config {config}: its name {name!r} cannot name a folder under --out; rename it")
            if label in labels:  # the same runs counted twice, or two configs' runs in one folder
                other, other_path = labels[label]
                parser.error(f"--configs names {path or config} twice" if other_path == path else
                             f"--configs {other} and {config} would share the runs in {args.out / label}; "
                             "rename one")
            labels[label] = (config, path)
            for seed in seeds:
                jobs.append(Job(label, path, tuple(args.set), seed, args.out / label / f"seed_{seed}", args.nproc))
        problem = check_existing_runs(jobs)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            raise SystemExit(2)
        failed = [] if args.report_only else run_all(jobs, args.jobs)
        curves = curves_path(args.out, list(dict.fromkeys(job.label for job in jobs)))
    final = args.final if args.final is not None else round(args.threshold - 0.05, 6)
    try:
        runs = read_runs(jobs)
        print(report(jobs, args.threshold, final, runs), flush=True)
        written = None if args.no_plot else plot_curves(jobs, args.threshold, curves, runs)
    except ValueError as exc:  # a run's files damaged by hand or by a full disk
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not args.no_plot:
        print(f"curves: {written}" if written else "curves: no run has a full window of episodes yet", flush=True)
    if failed:
        logs = ", ".join(str(job.run_dir.parent / f"{job.run_dir.name}.log") for job in failed[:3])
        print(f"error: {len(failed)} run(s) failed; see {logs}{' ...' if len(failed) > 3 else ''}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
