"""Why a MiniGrid Memory policy fails: does it look at the cue, and does its recurrent state keep it?

In MiniGrid-MemoryS<N>-v0 the agent starts in a small room facing east, towards a hallway; an object
(a key or a ball: the cue) lies behind it, at x = 1. At the hallway's end a key and a ball lie one on
each side, and the episode succeeds if the agent steps beside the one that matches the cue. The agent
starts at x = 1 (where the cue is in view from the first step) in a quarter of the episodes of
MemoryS7; elsewhere it must turn round to see the cue. A policy at chance (a mean return near 0.5) can
fail in two ways, and they call for different changes:

- it never turns round to look, so its memory has nothing to keep (an exploration failure);
- it looks, but its state no longer holds the cue when it chooses (a memory failure).

For each checkpoint this runs episodes with the policy (sampled actions, as in training) and reports:
the success rate; the share of episodes in which the cue was ever in the agent's observation before the
choice (inside its 7x7 view and not hidden by a wall),
and the success rate with and without a sighting; and how well a linear probe reads the cue from the
core's state (the whole state: for an LSTM both h and c) at two moments: just after the last step that
had the cue in view (is it written?) and at the final step (is it still there when the policy chooses?),
both over the episodes that saw the cue (the others cannot hold it), and at every step in between:
the probe's accuracy k steps after the last sighting, for k = 0 to 15, over the sighted episodes that
lasted that long (``probe_by_lag``; in the JSON, and drawn with ``--plot``): how fast the state forgets.
The probe is a ridge-regression classifier fitted on half the episodes and scored on the other half,
both ways round, and scored by balanced accuracy (`probe_accuracy`): 0.5 is chance however uneven the
keys and balls among the sighted episodes. Each env contributes its first episodes, the same number for
every env, so long episodes count as often as short ones.

    python benchmarks/memory_probe.py runs/memory-rims-ppo/checkpoint.pt runs/memory-lstm-ppo/checkpoint.pt
    python benchmarks/memory_probe.py CKPT --episodes 1000 --json probe.json
    python benchmarks/memory_probe.py CKPT1 CKPT2 --plot forgetting.png   # probe accuracy by steps since the cue
    python benchmarks/memory_probe.py CKPT --env MiniGrid-MemoryS9-v0     # on a held-out hallway length

Exit status: 0 done; 1 the --json or --plot file could not be written at the end (the table was
printed); 2 bad input (a missing or damaged checkpoint, a policy not trained on a MiniGrid Memory env, a
bad number, a --json or --plot file that exists or a folder that cannot take it), with one line naming
it, before any probing.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Run from anywhere: the package lives one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MEMORY_ENV_PREFIX = "MiniGrid-Memory"  # the envs whose cue this probe knows where to find
MAX_LAG = 15  # steps after the last sighting that probe_by_lag measures (MemoryS7's hallway is ~5-10 steps)
MIN_LAG_EPISODES = 16  # fewer sighted episodes that last k steps: no probe at lag k (None)


@dataclass
class ProbeResult:
    """What `probe_checkpoint` measured on one policy."""

    checkpoint: str
    episodes: int
    success_rate: float
    cue_seen: float  # share of episodes with the cue in view at some step
    success_when_seen: float | None  # None when no episode saw (or every episode saw) the cue
    success_when_unseen: float | None
    # Probe accuracies over the episodes that saw the cue (None with fewer than 4 of them):
    probe_after_sighting: float | None  # the state just after the last step with the cue in view
    probe_at_choice: float | None  # the state of the final step
    # probe_by_lag[k]: the state k steps after the last sighting, over the sighted episodes that lasted
    # k more steps (None with fewer than MIN_LAG_EPISODES of them); [0] is probe_after_sighting's states.
    probe_by_lag: list[float | None]
    lag_episodes: list[int]  # [k]: how many sighted episodes lasted k steps past their last sighting


def probe_accuracy(features: np.ndarray, labels: np.ndarray, ridge: float = 1.0) -> float | None:
    """Held-out balanced accuracy of a linear read-out of binary ``labels`` from ``features``.

    A ridge-regression classifier on standardised features (targets -1 and +1), fitted on the first
    half of the rows and scored on the second, then the other way round; the mean of the two. Each
    half is scored by balanced accuracy (the mean of the two classes' hit rates), so a read-out that
    only learned which cue is commoner scores 0.5, however uneven the split.

    :param features: ``(n, d)`` one row per episode.
    :param labels: ``(n,)`` zeros and ones.
    :param ridge: the L2 penalty (on standardised features; it keeps a wide state from fitting noise).
    :return: balanced accuracy in [0, 1], 0.5 being chance; None when a half lacks one of the classes.
    """
    features = np.asarray(features, dtype=np.float64)
    targets = np.where(np.asarray(labels) > 0, 1.0, -1.0)
    half = len(targets) // 2
    if half < 2:
        raise ValueError(f"probe_accuracy needs at least 4 rows, got {len(targets)}")
    folds = [(slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))]
    if any(len(set(targets[part])) < 2 for fold in folds for part in fold):
        return None
    scores = []
    for fit, score in folds:
        mean = features[fit].mean(axis=0)
        scale = features[fit].std(axis=0) + 1e-6
        x_fit = np.hstack([(features[fit] - mean) / scale, np.ones((len(targets[fit]), 1))])
        x_score = np.hstack([(features[score] - mean) / scale, np.ones((len(targets[score]), 1))])
        penalty = ridge * np.eye(x_fit.shape[1])
        penalty[-1, -1] = 0.0  # the intercept is not shrunk
        weights = np.linalg.solve(x_fit.T @ x_fit + penalty, x_fit.T @ targets[fit])
        hits = np.sign(x_score @ weights) == targets[score]
        scores.append(float(np.mean([hits[targets[score] == side].mean() for side in (-1.0, 1.0)])))
    return float(np.mean(scores))


def _cue_is_key(env) -> bool:
    """Whether the cue of ``env``'s current episode is a key (else a ball)."""
    from minigrid.core.world_object import Key

    base = env.unwrapped
    return isinstance(base.grid.get(1, base.height // 2 - 1), Key)


def _cue_in_view(env) -> bool:
    """Whether the cue is in the agent's current observation: inside its view and not hidden by a wall."""
    base = env.unwrapped
    view = base.relative_coords(1, base.height // 2 - 1)
    if view is None:
        return False
    _, visible = base.gen_obs_grid()
    return bool(visible[view])


def load_memory_policy(path: str):
    """The policy in ``path``, checked to be trained on a MiniGrid Memory env.

    :raises CheckpointError: when the file is missing or not a checkpoint.
    :raises ValueError: when the policy was trained on another env.
    """
    from agents.evaluation import training_tasks
    from policies import load_policy

    policy = load_policy(path)
    trained_on = [task.env_id for task in training_tasks(policy)]  # every task of a multi-task run
    if not all(env_id.startswith(MEMORY_ENV_PREFIX) for env_id in trained_on):
        raise ValueError(f"{path} was trained on {', '.join(trained_on)}, not a MiniGrid-Memory env"
                         + (" on every task" if len(trained_on) > 1 else ""))
    return policy


def check_probe_env(path: str, policy, env_id: str | None) -> None:
    """Refuse probing a multi-task run without ``env_id``: its checkpoint's own env is only the task it ended on.

    :raises ValueError: naming the tasks.
    """
    from agents.evaluation import training_tasks

    tasks = [task.env_id for task in training_tasks(policy)]
    if env_id is None and len(set(tasks)) > 1:
        raise ValueError(f"{path} was trained on several tasks ({', '.join(tasks)}): give --env to say which to probe")


def probe_policy(policy, venv, episodes: int, name: str = "") -> ProbeResult:
    """Run ``episodes`` episodes of ``policy`` in ``venv`` (in-process MiniGrid Memory envs) and measure.

    Each env contributes a fixed share of the episodes, its first ones (env i ``episodes // n_envs``,
    one more for the first ``episodes % n_envs``): counting episodes in the order they end would favour
    short ones, and the policies that look back have the longer episodes.

    :param policy: anything with ``initial_state(n_envs)`` and ``act(obs, state, episode_start)`` as
        :class:`policies.Policy` has them.
    :param venv: a vec env with ``.envs`` (the gymnasium envs, stepped in this process).
    :param episodes: how many episodes to measure.
    :param name: what the result calls the policy.
    """
    envs = venv.envs
    n_envs = len(envs)
    quota = [episodes // n_envs + (i < episodes % n_envs) for i in range(n_envs)]
    obs = venv.reset()
    state = policy.initial_state(n_envs)
    starts = np.ones(n_envs, dtype=bool)
    cue = [_cue_is_key(env) for env in envs]
    seen = np.zeros(n_envs, dtype=bool)
    # Per env, the states from the last sighting on: [0] just after it, [k] k steps later (MAX_LAG at most).
    since_sighting: list[list[np.ndarray]] = [[] for _ in range(n_envs)]
    rows: list[tuple[bool, bool, bool, list[np.ndarray], np.ndarray]] = []
    done_per_env = [0] * n_envs
    while any(done < want for done, want in zip(done_per_env, quota)):
        in_view = [_cue_in_view(env) for env in envs]  # of the observation the policy is about to see
        actions, state = policy.act(obs, state, starts)
        step_state = state.detach().cpu().numpy()
        for i in range(n_envs):
            if in_view[i]:
                seen[i] = True
                since_sighting[i] = [step_state[i].copy()]
            elif seen[i] and len(since_sighting[i]) <= MAX_LAG:
                since_sighting[i].append(step_state[i].copy())
        obs, rewards, dones, _ = venv.step(actions)
        for i in np.flatnonzero(dones):
            if done_per_env[i] < quota[i]:
                rows.append((cue[i], bool(rewards[i] > 0), bool(seen[i]), since_sighting[i], step_state[i].copy()))
                done_per_env[i] += 1
            cue[i] = _cue_is_key(envs[i])  # the vec env has already reset it
            seen[i], since_sighting[i] = False, []
        starts = dones
    success = np.array([r[1] for r in rows])
    saw = np.array([r[2] for r in rows])
    sighted = [r for r in rows if r[2]]
    sighted_cue = np.array([r[0] for r in sighted])
    enough = len(sighted) >= 4
    by_lag: list[float | None] = []
    lag_episodes: list[int] = []
    for lag in range(MAX_LAG + 1):
        lasted = [r for r in sighted if len(r[3]) > lag]
        lag_episodes.append(len(lasted))
        by_lag.append(probe_accuracy(np.stack([r[3][lag] for r in lasted]), np.array([r[0] for r in lasted]))
                      if len(lasted) >= MIN_LAG_EPISODES else None)
    return ProbeResult(
        checkpoint=name,
        episodes=len(rows),
        success_rate=float(success.mean()),
        cue_seen=float(saw.mean()),
        success_when_seen=float(success[saw].mean()) if saw.any() else None,
        success_when_unseen=float(success[~saw].mean()) if (~saw).any() else None,
        probe_after_sighting=probe_accuracy(np.stack([r[3][0] for r in sighted]), sighted_cue) if enough else None,
        probe_at_choice=probe_accuracy(np.stack([r[4] for r in sighted]), sighted_cue) if enough else None,
        probe_by_lag=by_lag,
        lag_episodes=lag_episodes,
    )


def probe_checkpoint(path: str, episodes: int = 400, n_envs: int = 16, seed: int = 0, policy=None,
                     env_id: str | None = None) -> ProbeResult:
    """Load the policy in ``path`` and measure it on ``episodes`` episodes of its Memory env (module doc).

    :param policy: the policy ``load_memory_policy(path)`` already returned, if the caller has it.
    :param env_id: another MiniGrid Memory env to measure it on (a held-out hallway length; default: its own).
    :raises CheckpointError: when the file is missing or not a checkpoint.
    :raises ValueError: when the policy was not trained on a MiniGrid Memory env, or ``env_id`` is not one.
    """
    import torch

    from agents.evaluation import make_policy_env

    if env_id is not None and not env_id.startswith(MEMORY_ENV_PREFIX):
        raise ValueError(f"--env {env_id} is not a MiniGrid-Memory env")
    if policy is None:
        policy = load_memory_policy(path)
    check_probe_env(path, policy, env_id)
    torch.manual_seed(seed)  # the sampled actions
    # In-process gymnasium envs whatever the policy trained with: the probe reads each env's grid.
    venv = make_policy_env(policy, n_envs=n_envs, seed=seed, env_id=env_id, vec_env="dummy", backend="gymnasium")
    try:
        return probe_policy(policy, venv, episodes, name=str(path) if env_id is None else f"{path} on {env_id}")
    finally:
        venv.close()


def _short_name(checkpoint: str) -> str:
    """``.../memory-rims-ppo-k1/seed_3/checkpoint.pt`` -> ``memory-rims-ppo-k1/seed_3`` (a legend label;
    ``... on MiniGrid-MemoryS9-v0`` keeps its env, shortened to ``on S9``)."""
    name, _, env_id = checkpoint.partition(" on ")
    path = Path(name)
    if path.name == "checkpoint.pt":
        path = path.parent
    where = f" on {env_id.removeprefix('MiniGrid-Memory').removesuffix('-v0')}" if env_id else ""
    return "/".join(path.parts[-2:]) + where


def _run_folder(checkpoint: str) -> Path:
    """The run folder of a probed checkpoint: ``<run>/checkpoint.pt`` and ``<run>/checkpoints/<numbered>.pt``
    both give ``<run>`` (a run folder given as such is itself)."""
    path = Path(checkpoint.partition(" on ")[0])
    if path.suffix == ".pt":
        path = path.parent
    path = path.parent if path.name == "checkpoints" else path
    return path if path.name else path.resolve()  # "checkpoints/x.pt" probed from inside the run folder


def lag_panels(results: list[ProbeResult], max_lines: int = 10) -> dict[str, list[ProbeResult]]:
    """How :func:`plot_by_lag` splits ``results`` into panels, in the order they first appear: all in one (named
    ``""``) when there are at most ``max_lines`` (one colour cycle), else one per config folder, the folder above
    each run's folder (``.../memory-rims-ppo-k1/seed_3/checkpoint.pt`` -> ``memory-rims-ppo-k1``; a study's
    ``runs/lstm`` -> ``lstm``), named by as many of its last path parts as tell the panels apart, and split into
    ``name (1/2)``, ``name (2/2)``... where one config has more than ``max_lines`` lines."""
    if len(results) <= max_lines:
        return {"": list(results)}
    groups: dict[Path, list[ProbeResult]] = {}
    for result in results:
        groups.setdefault(_run_folder(result.checkpoint).parent, []).append(result)
    depth = 1
    while len({Path(*folder.parts[-depth:]) for folder in groups}) < len(groups):
        depth += 1
    panels: dict[str, list[ProbeResult]] = {}
    for folder, members in groups.items():
        name = Path(*folder.parts[-depth:]).as_posix() if folder.parts else "."
        chunks = [members[i:i + max_lines] for i in range(0, len(members), max_lines)]
        for number, chunk in enumerate(chunks, 1):
            panels[name if len(chunks) == 1 else f"{name} ({number}/{len(chunks)})"] = chunk
    return panels


def _line_label(result: ProbeResult, panel: str) -> str:
    """A line's legend label: in a config's panel, what tells its runs apart (``seed_3``, ``seed_3/checkpoint_...``,
    plus ``on S9`` for a held-out env); in the one panel of a few lines, :func:`_short_name`."""
    if not panel:
        return _short_name(result.checkpoint)
    name, _, env_id = result.checkpoint.partition(" on ")
    run = _run_folder(result.checkpoint)
    path = Path(name)
    label = run.name if path.name == "checkpoint.pt" or path == run else f"{run.name}/{path.stem}"
    return label + (f" on {env_id.removeprefix('MiniGrid-Memory').removesuffix('-v0')}" if env_id else "")


def plot_by_lag(results: list[ProbeResult], path: Path) -> Path:
    """Draw each result's ``probe_by_lag`` (a line per checkpoint; lags without a probe left out) as a PNG
    at ``path``, a new file: one that exists, even one that appeared while probing, is never replaced.

    More lines than one colour cycle holds (10) go in one panel per config folder (:func:`lag_panels`), so no
    two lines of a panel share a colour.

    :raises FileExistsError: when ``path`` exists (nothing is written).
    :raises OSError: when it cannot be written (no partial file is left).
    """
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from agents.run_dir import write_new_file

    panels = lag_panels(results)
    fig = Figure(figsize=(6.4 * min(len(panels), 2), 4.0 * -(-len(panels) // 2)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(-(-len(panels) // 2), min(len(panels), 2), squeeze=False, sharey=True).ravel()
    lowest = min((a for r in results for a in r.probe_by_lag if a is not None), default=0.5)
    for ax, (panel, members) in zip(axes, panels.items()):
        for result in members:
            points = [(lag, acc) for lag, acc in enumerate(result.probe_by_lag) if acc is not None]
            if points:
                lags, accuracy = zip(*points)
                ax.plot(lags, accuracy, marker="o", markersize=3, label=_line_label(result, panel))
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_xlabel("steps since the cue was last in view")
        ax.set_ylabel("probe balanced accuracy (held out)")
        ax.set_ylim(min(0.25, lowest - 0.03), 1.02)
        longest = max((lag for r in members for lag, a in enumerate(r.probe_by_lag) if a is not None), default=MAX_LAG)
        ax.set_xlim(-0.3, longest + 0.3)
        ax.grid(alpha=0.3)
        ax.set_title(panel or "Does the core's state still hold the cue? (each lag: the sighted episodes "
                     "that lasted it)", fontsize=9)
        # Below the panel, not on it: inside, it hid the points near chance that the figure is read for.
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if len(panels) > 1:
        fig.suptitle("Does the core's state still hold the cue? (each lag: the sighted episodes that lasted it)",
                     fontsize=10)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
    write_new_file(path, png.getvalue())
    return path


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(results: list[ProbeResult]) -> str:
    """A markdown table of ``results``, one row per checkpoint."""
    lines = ["| checkpoint | episodes | success | cue seen | success if seen | if unseen | probe after sighting | probe at choice |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.checkpoint} | {r.episodes} | {r.success_rate:.2f} | {r.cue_seen:.2f} | "
                     f"{_number(r.success_when_seen)} | {_number(r.success_when_unseen)} | "
                     f"{_number(r.probe_after_sighting)} | {_number(r.probe_at_choice)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/memory_probe.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files of policies trained on MiniGrid-MemoryS*-v0")
    parser.add_argument("--episodes", type=int, default=400, help="episodes per checkpoint (default 400)")
    parser.add_argument("--n-envs", type=int, default=16, help="envs stepped together (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="env and action-sampling seed (default 0)")
    parser.add_argument("--env", help="probe on this MiniGrid Memory env instead of the training one, e.g. "
                                      "MiniGrid-MemoryS9-v0 (a held-out hallway length)")
    parser.add_argument("--json", type=Path, help="also write the results here (refused if it exists)")
    parser.add_argument("--plot", type=Path, help="also draw probe accuracy by steps since the cue to this PNG "
                                                  "(refused if it exists)")
    args = parser.parse_args(argv)
    if not 8 <= args.episodes <= 1_000_000:
        parser.error(f"--episodes must be between 8 and 1,000,000, got {args.episodes}")
    if not 1 <= args.n_envs <= 1024:
        parser.error(f"--n-envs must be between 1 and 1024, got {args.n_envs}")
    if not 0 <= args.seed < 2**31:
        parser.error(f"--seed must be between 0 and 2**31 - 1, got {args.seed}")
    if args.env is not None:
        from envs.registry import check_env_id

        if not args.env.startswith(MEMORY_ENV_PREFIX):
            parser.error(f"--env {args.env} is not a MiniGrid-Memory env (the probe reads the Memory envs' cue)")
        try:
            check_env_id(args.env)
        except ValueError as exc:
            parser.error(f"--env: {exc}")
    from agents.run_dir import output_file_problem, write_new_file

    for option, path in (("--json", args.json), ("--plot", args.plot)):
        problem = path and output_file_problem(path, overwrite=False, overwrite_option=None)
        if problem:
            parser.error(f"{option} {problem}")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        parser.error(f"--plot {args.plot}: the figure is a PNG; give a name ending in .png")
    if args.json is not None and args.plot is not None and args.json.resolve() == args.plot.resolve():
        parser.error(f"--json and --plot are the same file ({args.json}); give two names")

    import torch

    from policies.checkpoint import CheckpointError

    torch.set_num_threads(1)
    try:  # every checkpoint is checked before any is probed: a bad last one must not waste the others' time
        policies = [load_memory_policy(path) for path in args.checkpoints]
        for path, policy in zip(args.checkpoints, policies):
            check_probe_env(path, policy, args.env)
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"memory_probe: {exc}", file=sys.stderr)
        return 2
    results = []
    for path, policy in zip(args.checkpoints, policies):
        results.append(probe_checkpoint(path, args.episodes, args.n_envs, args.seed, policy=policy, env_id=args.env))
        print(f"probed {path}", file=sys.stderr, flush=True)
    print(table(results))
    status = 0
    if args.json is not None:
        try:  # a new file: one that appeared while probing is kept
            write_new_file(args.json, (json.dumps([asdict(r) for r in results], indent=2) + "\n").encode())
        except OSError as exc:
            print(f"memory_probe: could not write --json {args.json}: {exc.strerror or exc}", file=sys.stderr)
            status = 1
    if args.plot is not None:
        try:
            print(f"plot: {plot_by_lag(results, args.plot)}")
        except OSError as exc:
            print(f"memory_probe: could not write --plot {args.plot}: {exc.strerror or exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
