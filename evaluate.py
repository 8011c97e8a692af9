"""Evaluate trained checkpoints: raw scores and success rates, on held-out envs too.

    python evaluate.py runs/doorkey-5x5-rims-ppo/checkpoint.pt          # its own training env
    python evaluate.py runs/doorkey-5x5-rims-ppo --suite doorkey --episodes 100  # train + held-out envs
    python evaluate.py runs/*/checkpoint.pt --suite doorkey --json results.json   # side by side
    python evaluate.py CKPT --env MiniGrid-DoorKey-8x8-v0 --video videos --plot plots
    python evaluate.py --list-suites

Episodes run with the checkpoint's own env preprocessing but unclipped rewards, the
recurrent state reset at every episode start. Exactly --episodes episodes run per env,
side by side in parallel envs; episode i is seeded by its own seeds (from --seed and i),
so its return does not depend on --n-envs. Mean returns come with a 95% bootstrap interval,
success rates with a 95% Wilson interval.
"""

from __future__ import annotations

# Only the standard library, the argument parser and agents.run_dir (standard library only) are
# imported at the top: --help and bad arguments answer in a fraction of a second. torch, gymnasium,
# ale-py and SB3 are imported by main() once the arguments are known to be good.
import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.run_dir import OutputExistsError, atomic_output, cli_path, output_file_problem, output_folder_problem

if TYPE_CHECKING:  # for annotations only; never imported at run time from here
    from agents.evaluation import EvalTarget
    from policies.policy import Policy

# Seeds away from the small ones training configs use, so evaluation episodes are not the
# first training levels replayed.
DEFAULT_SEED = 10_000
DEFAULT_MAX_VIDEO_FRAMES = 1000
MAX_EPISODES = 1_000_000  # per env: more is a typo, and would run for days
MAX_ENVS = 65_536  # parallel envs, as for training (env.n_envs)


class UsageError(Exception):
    """A command line that cannot be run as given (an output that cannot be written, ...)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage of this many options would bury the message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (standard library only: building and using it imports no torch)."""
    parser = _Parser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT",
                        help="checkpoint files (or run directories holding checkpoint.pt); local paths")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--suite", help="evaluate on this held-out suite's train and held-out envs (see --list-suites)")
    where.add_argument("--env", action="append", dest="envs", metavar="ID", help="evaluate on this env id (repeatable)")
    parser.add_argument("--suite-param", action="append", default=[], metavar="KEY=VALUE",
                        help="parameter of a parametric suite, e.g. --suite atari-modes --suite-param game=Breakout")
    parser.add_argument("--list-suites", action="store_true", help="list the held-out suites and exit")
    parser.add_argument("--episodes", type=int, default=100, help="episodes per env (default 100)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"evaluation seed (>= 0, default {DEFAULT_SEED}): episode i's env seed and action "
                             "samples come from it and i alone")
    parser.add_argument("--deterministic", action="store_true",
                        help="take the most likely action instead of sampling (greedy MiniGrid policies can "
                             "loop until the time limit)")
    parser.add_argument("--n-envs", type=int, default=None, metavar="N",
                        help="parallel envs (default: --episodes, at most 100); the per-episode results do not "
                             "depend on it, up to float rounding in the batched forward pass")
    parser.add_argument("--max-episode-steps", type=int, metavar="N",
                        help="truncate episodes after N steps (on MiniGrid and Atari it only shortens them: their own "
                             "limits, MiniGrid's max_steps, still apply; other ids' registered limit it replaces)")
    parser.add_argument("--video", type=cli_path, metavar="DIR", help="write a video of the first episode per env here")
    parser.add_argument("--video-format", choices=("gif", "mp4"), default="gif",
                        help="gif (default, needs nothing more) or mp4 (needs imageio-ffmpeg)")
    parser.add_argument("--max-video-frames", type=int, default=DEFAULT_MAX_VIDEO_FRAMES, metavar="N",
                        help=f"keep at most N frames per video (default {DEFAULT_MAX_VIDEO_FRAMES}; 0 keeps all; "
                             "a 16x16 MiniGrid episode can last 2560 steps)")
    parser.add_argument("--plot", type=cli_path, metavar="DIR",
                        help="write a PNG of the first episode's module activity per env here")
    parser.add_argument("--json", type=cli_path, metavar="FILE", help="write the results as JSON")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --json file and existing plots/videos of the same names "
                             "(without it they are refused before any episode runs)")
    parser.add_argument("--device", default="cpu", help="torch device for the policies (default cpu)")
    parser.add_argument("--torch-threads", type=int, default=1, metavar="N",
                        help="CPU threads for torch (default 1: on a busy machine extra threads make it many "
                             "times slower); 0 keeps torch's default")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (exit status 2 with one line on bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.list_suites and not args.checkpoints:
        parser.error("give at least one CHECKPOINT (or --list-suites)")
    if not 1 <= args.episodes <= MAX_EPISODES:
        parser.error(f"--episodes must be between 1 and {MAX_EPISODES:,}, got {args.episodes}")
    if args.n_envs is not None and not 1 <= args.n_envs <= MAX_ENVS:
        parser.error(f"--n-envs must be between 1 and {MAX_ENVS:,}, got {args.n_envs}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.max_episode_steps is not None and args.max_episode_steps < 1:
        parser.error(f"--max-episode-steps must be >= 1, got {args.max_episode_steps}")
    if args.max_video_frames < 0:
        parser.error(f"--max-video-frames must be >= 0 (0 keeps all frames), got {args.max_video_frames}")
    cpus = os.cpu_count() or 1
    if not 0 <= args.torch_threads <= cpus:  # more threads than CPUs only slows a run (or exhausts memory)
        parser.error(f"--torch-threads must be between 0 and this machine's {cpus} CPUs, got {args.torch_threads}")
    if args.suite_param and args.suite is None:
        parser.error("--suite-param needs --suite")
    return args


# -- output destinations, checked before any episode runs ---------------------------------------


def check_planned_files(paths: list[Path], option: str, overwrite: bool) -> None:
    """Refuse to replace existing plots/videos unless ``overwrite`` (never lose a file silently)."""
    folders = [p for p in paths if p.is_dir()]
    if folders:
        raise UsageError(f"{option}: {folders[0]} is a folder where a file would go")
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UsageError(f"{option}: {existing[0]} exists{more}; pass --overwrite to replace, or choose another folder")


# -- tables -----------------------------------------------------------------------------------


def print_suites() -> None:
    """Print every suite with its train and held-out env ids."""
    from envs import list_suites

    for suite in list_suites():
        print(f"{suite.name}: {suite.description}")
        for split, specs in (("train", suite.train), ("held-out", suite.heldout)):
            shown = ", ".join(f"{spec.env_id}" + (f" [{spec.name}]" if spec.options else "") for spec in specs)
            print(f"  {split:9s} {shown}")


def parse_suite_params(items: list[str]) -> dict[str, Any]:
    """``["game=Breakout", "num_train=50"]`` -> ``{"game": "Breakout", "num_train": 50}`` (YAML values)."""
    import yaml

    params: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--suite-param {item!r} must look like KEY=VALUE")
        try:
            params[key] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"--suite-param {key}: value {text!r} is not valid YAML ({exc})") from None
    return params


def checkpoint_labels(paths: list[Path]) -> list[str]:
    """Short names for checkpoints: the run directory's name, or the full path where names repeat."""
    def short(path: Path) -> str:
        path = Path(os.path.abspath(path))  # "." and "checkpoint.pt" name their folder (symlinks kept as given)
        if path.is_dir():
            return path.name
        return path.parent.name if path.name == "checkpoint.pt" else path.stem

    def full(path: Path, label: str) -> str:
        # The path as typed, unless it does not name the run ("." or "checkpoint.pt" from inside the run folder).
        return str(path) if label in path.parts or path.stem == label else os.path.abspath(path)

    labels = [short(p) for p in paths]
    return [full(p, label) if labels.count(label) > 1 else label for p, label in zip(paths, labels, strict=True)]


def _file_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _unique_stems(stems: list[str]) -> list[str]:
    """``stems`` with each repeat numbered (``x``, ``x-2``, ``x-3``), so that no two name one file."""
    taken: set[str] = set()
    unique = []
    for stem in stems:
        candidate, n = stem, 1
        while candidate in taken:
            n += 1
            candidate = f"{stem}-{n}"
        taken.add(candidate)
        unique.append(candidate)
    return unique


def _is_results_file(path: Path) -> bool:
    """Whether ``path`` is empty or holds what ``--json`` writes (one JSON object with a ``checkpoints``
    list): the only files ``--overwrite`` may replace. Not a checkpoint, and not another JSON file of a run
    (``metrics.jsonl``, ``provenance.json``, a study's evaluation points), whose loss could not be undone."""
    try:
        with path.open("rb") as handle:
            head = handle.read(64).removeprefix(b"\xef\xbb\xbf").lstrip()  # a UTF-8 byte-order mark
            if not head:
                return True
            if head[:1] != b"{" or path.stat().st_size > 1 << 30:  # a checkpoint, or far beyond any results file
                return False
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError):  # unreadable, not UTF-8, not one JSON document (JSON Lines, a checkpoint)
        return False
    # A study's evaluation point (eval/point_*.json) has evaluate.py's shape plus the settings it was made with.
    return (isinstance(data, dict) and isinstance(data.get("checkpoints"), list) and "episodes" in data
            and "study_eval" not in data)


def _number(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _with_ci(value: float | None, ci: list[float] | None, show: Any = _number) -> str:
    """``"0.74 [0.66, 0.81]"``: a mean and its 95% interval."""
    if value is None:
        return "-"
    if not ci or any(c is None or math.isnan(c) for c in ci):
        return show(value)
    return f"{show(value)} [{show(ci[0])}, {show(ci[1])}]"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain-text table, columns padded to their widest cell (first column left-aligned)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    def line(cells: list[str]) -> str:
        padded = (str(c).ljust(w) if i == 0 else str(c).rjust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _env_cell(result: dict[str, Any]) -> str:
    """The env id, plus the suite entry's name where one id has several variants (modes, level seeds)."""
    from agents.evaluation import short_env_name

    plain = short_env_name(result["env_id"])
    cell = result["env_id"] if result["name"] == plain else f"{result['env_id']} [{result['name']}]"
    return cell + (" *" if result.get("training_env") else "")


TRAINING_ENV_NOTE = "* an env the checkpoint was trained on (every task of a multi-task run)"
CI_NOTE = "[95% interval: bootstrap over episodes for the return, Wilson's for the success rate]"


def single_table(results: list[dict[str, Any]]) -> str:
    """One checkpoint: a row per env."""
    from agents.evaluation import SPLIT_WORDS

    headers = ["env", "split", "episodes", "mean return [95% CI]", "std", "success [95% CI]", "mean length",
               "timed out"]
    rows = [[_env_cell(r), SPLIT_WORDS.get(r["split"], r["split"]) or "-", str(r["episodes"]),
             _with_ci(r["mean_return"], r.get("mean_return_ci")), _number(r["std_return"]),
             _with_ci(r["success_rate"], r.get("success_rate_ci"), _percent), _number(r["mean_length"], 1),
             _percent(sum(r["truncated"]) / len(r["truncated"])) if r.get("truncated") else "-"]
            for r in results]
    notes = [TRAINING_ENV_NOTE] if any(r.get("training_env") for r in results) else []
    return "\n".join([format_table(headers, rows), *notes])


def comparison_table(runs: list[dict[str, Any]]) -> str:
    """Several checkpoints: a row per checkpoint, a column per env ("mean return / success")."""
    columns: list[str] = []
    for run in runs:
        for r in run["results"]:
            if r["env_label"] not in columns:
                columns.append(r["env_label"])
    headers = ["checkpoint", "core", *columns]
    rows = []
    for run in runs:
        by_label = {r["env_label"]: r for r in run["results"]}
        cells = []
        for column in columns:
            r = by_label.get(column)
            if r is None:
                cells.append("")
                continue
            cell = _with_ci(r["mean_return"], r.get("mean_return_ci"))
            if r["success_rate"] is not None:
                cell += f" / {_with_ci(r['success_rate'], r.get('success_rate_ci'), _percent)}"
            cells.append(cell + (" *" if r.get("training_env") else ""))
        rows.append([run["label"], run["core"], *cells])
    notes = [f"(cells: mean return / success rate, each {CI_NOTE})"]
    if any(r.get("training_env") for run in runs for r in run["results"]):
        notes.append(TRAINING_ENV_NOTE)
    return "\n".join([format_table(headers, rows), *notes])


# -- the command ------------------------------------------------------------------------------


def _refuse_run_without_checkpoint_yet(path: Path) -> None:
    """A run folder that a trainer is working in and that has no checkpoint yet: say so, with its pid (the
    loader alone would call it a run stopped before its first checkpoint)."""
    from agents.evaluation import EvaluationError
    from agents.run_dir import lock_holder

    if path.is_dir() and not (path / "checkpoint.pt").exists():
        holder = lock_holder(path)
        if holder is not None:
            raise EvaluationError(f"{path} is being trained now (pid {holder}) and has written no checkpoint yet: "
                                  f"evaluate it once its first checkpoint is written")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status (0 ok, 2 bad input, 130 interrupted)."""
    args = parse_args(argv)
    if args.list_suites:
        print_suites()
        return 0
    try:
        # Outputs are checked before anything heavy is imported or any episode runs: a typo in
        # --json must not surface after minutes of evaluation, with the results lost.
        if args.json is not None:
            problem = output_file_problem(args.json, args.overwrite)
            if problem:
                raise UsageError(f"--json {problem}")
            # e.g. `--json runs/*/checkpoint.pt`, or a run's metrics.jsonl: --overwrite is for earlier results.
            if args.json.is_file() and not _is_results_file(args.json):
                raise UsageError(f"--json {args.json} exists and is not a results file of evaluate.py (a checkpoint, "
                                 "a training log?); --overwrite replaces only earlier --json results: choose another "
                                 "name")
        for option, folder in (("--plot", args.plot), ("--video", args.video)):
            problem = output_folder_problem(folder) if folder is not None else None
            if problem:
                raise UsageError(f"{option} {problem}")
        return _evaluate(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug or not _is_input_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _is_input_error(exc: BaseException) -> bool:
    """Whether ``exc`` is bad input (one message, exit 2) rather than a bug (a traceback)."""
    if isinstance(exc, (UsageError, OSError)):
        return True
    # The package's own errors; looked up only if their modules were imported (they were, if raised).
    known = [getattr(sys.modules.get(module), name, None) for module, name in
             (("agents.evaluation", "EvaluationError"), ("policies.checkpoint", "CheckpointError"))]
    return any(isinstance(exc, cls) for cls in known if isinstance(cls, type))


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from agents.evaluation import (
        SPLIT_WORDS,
        EvaluationError,
        check_spaces,
        evaluate_policy,
        evaluation_options,
        own_targets,
        resolve_targets,
        video_format_available,
    )
    from agents.config import SAME_ENV_OPTIONS
    from policies.policy import check_device, load_policy

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise EvaluationError(f"--device {args.device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {args.device}, but no CUDA GPU is available here; use --device cpu")
    try:
        check_device(device)  # the other devices this machine lacks (MPS), in load_policy's words
    except ValueError as exc:
        raise EvaluationError(f"--device {args.device}: {exc}") from None
    overrides = {"max_episode_steps": args.max_episode_steps} if args.max_episode_steps is not None else {}
    if args.video is not None and not video_format_available(f".{args.video_format}"):
        raise EvaluationError("--video-format mp4 needs imageio-ffmpeg (pip install imageio-ffmpeg); use gif")
    suite_targets = resolve_targets(args.suite, args.envs, parse_suite_params(args.suite_param))

    # Load every checkpoint and check every (checkpoint, env) pair and every output file before
    # running any episode, so a bad last argument does not surface after minutes of evaluation.
    labels = checkpoint_labels([Path(c) for c in args.checkpoints])
    plans: list[tuple[str, Policy, list[tuple[EvalTarget, dict[str, Any], str]]]] = []
    for label, path in zip(labels, args.checkpoints, strict=True):
        _refuse_run_without_checkpoint_yet(Path(path))
        policy = load_policy(path, device=args.device)  # the raw string: a URL is refused by name
        targets = suite_targets if suite_targets is not None else own_targets(policy)
        dropped = {key: policy.env_options[key] for key in SAME_ENV_OPTIONS if policy.env_options.get(key)}
        if args.suite is not None and dropped:
            settings = ", ".join(f"env.{key}={value!r}" for key, value in dropped.items())
            print(f"note: {label} was trained with {settings}; a suite's envs are as the suite defines them, without "
                  f"these (--env {policy.env_id} evaluates with them)")
        pairs = []
        for target in targets:
            options = evaluation_options(policy, target, overrides)
            check_spaces(policy, target.env_id, options)
            pairs.append((target, options, _file_stem(f"{label}-{target.name}")))
        plans.append((label, policy, pairs))
    # Two inputs can give one file name (a/b/sig and a_b/sig; the same run named twice): number the
    # repeats so that no plot or video of this call replaces another.
    stems = _unique_stems([stem for _, _, pairs in plans for _, _, stem in pairs])
    numbered = iter(stems)
    plans = [(label, policy, [(target, options, next(numbered)) for target, options, _ in pairs])
             for label, policy, pairs in plans]
    if args.plot is not None:
        check_planned_files([args.plot / f"{stem}.png" for stem in stems], "--plot", args.overwrite)
    if args.video is not None:
        check_planned_files([args.video / f"{stem}.{args.video_format}" for stem in stems], "--video", args.overwrite)
    if args.json is not None:  # one name for two of this call's outputs: the later would replace the earlier
        folders = [folder for folder in (args.plot, args.video) if folder is not None]
        own = [*(args.plot / f"{stem}.png" for stem in stems if args.plot is not None),
               *(args.video / f"{stem}.{args.video_format}" for stem in stems if args.video is not None),
               *folders]  # files first: a clash names the file rather than its folder
        target = args.json.resolve()

        def overlaps(path: Path) -> bool:  # the same path, or one inside the other
            path = path.resolve()
            return path == target or path in target.parents or target in path.parents

        clash = next((path for path in own if overlaps(path)), None)
        if clash is not None:
            raise UsageError(f"--json {args.json} overlaps {clash}, which this call's --plot/--video writes: choose "
                             "another name")

    runs: list[dict[str, Any]] = []
    for label, policy, pairs in plans:
        run: dict[str, Any] = {"checkpoint": str(policy.path), "label": label, "core": policy.core_name,
                               "train_env": policy.env_id, "train_envs": [t.env_id for t in own_targets(policy)],
                               "results": []}
        for target, options, stem in pairs:
            result = evaluate_policy(
                policy, target.env_id, options, episodes=args.episodes, seed=args.seed,
                deterministic=args.deterministic, record_video=args.video is not None,
                record_info=args.plot is not None, n_envs=args.n_envs, progress=not args.no_progress,
                desc=f"{label} {target.name}", max_video_frames=args.max_video_frames or None,
            )
            training_env = target.is_training_env(policy)
            result.update(name=target.name, split=target.split, env_label=target.label, training_env=training_env)
            frames, total = result.pop("frames", None), result.pop("frames_total", None)
            trace = result.pop("trace", None)
            if frames is not None:
                path = _save_video(frames, args.video / f"{stem}.{args.video_format}", args.overwrite)
                result.update(video=str(path), video_frames=len(frames), video_frames_total=total)
                if total is not None and total > len(frames):
                    print(f"note: {path} shows the first {len(frames)} of the episode's {total} frames "
                          f"(cut by --max-video-frames {args.max_video_frames}; 0 keeps all)")
            if trace is not None:
                parts = [SPLIT_WORDS.get(target.split, target.split)] if target.split else []
                parts += ["the checkpoint's training env"] if training_env else []
                where = f"{target.name} ({', '.join(parts)})" if parts else target.name
                path = _save_plot(trace, args.plot / f"{stem}.png", f"{label} ({policy.core_name}) on {where}",
                                  policy.core_name, result.get("first_episode"), args.episodes, args.overwrite)
                result["plot"] = str(path)
            run["results"].append(result)
        runs.append(run)

    protocol = (f"{args.episodes} episode{'s' if args.episodes != 1 else ''} per env, "
                f"{'deterministic' if args.deterministic else 'sampled'} actions, seed {args.seed}")
    if len(runs) == 1:
        print(f"{runs[0]['label']} ({runs[0]['core']}, trained on {', '.join(runs[0]['train_envs'])}), {protocol}:")
        print(single_table(runs[0]["results"]))
    else:
        print(f"{protocol}:")
        print(comparison_table(runs))
    if args.json is not None:
        report = {"episodes": args.episodes, "seed": args.seed, "deterministic": args.deterministic,
                  "suite": args.suite, "max_video_frames": args.max_video_frames, "checkpoints": runs}
        text = json.dumps(report, indent=2, default=_jsonable) + "\n"
        written = _write_output(args.json, lambda temp: temp.write_text(text), args.overwrite)
        print(f"results written to {written}")
    return 0


def _write_output(path: Path, write: Callable[[Path], Any], overwrite: bool) -> Path:
    """Write an output through ``write(temporary path)`` and return where it went: ``path``, or without
    ``overwrite``, when a file appeared there during the evaluation (another evaluate.py writing the same
    name), the first free ``<stem>-<n><suffix>`` beside it, with a note (the outputs were checked before
    the first episode, so only a race gets here; neither call's results are lost)."""
    candidate = path
    for number in range(1, 1001):
        try:
            with atomic_output(candidate, replace=overwrite) as temp:
                write(temp)
        except OutputExistsError:  # only the name taken: any other error is the caller's to report
            candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
            continue
        if candidate != path:
            print(f"note: {path} appeared during the evaluation (another process?) and is kept; this call's "
                  f"output is {candidate}")
        return candidate
    raise OSError(f"cannot write {path}: it and {path.stem}-1 to -1000{path.suffix} beside it all exist")


def _save_video(frames: list[Any], path: Path, overwrite: bool) -> Path:
    from agents.evaluation import save_video

    return _write_output(path, lambda temp: save_video(frames, temp), overwrite)


def _save_plot(trace: dict[str, Any], path: Path, title: str, core: str, episode: dict[str, Any] | None,
               episodes: int, overwrite: bool) -> Path:
    # matplotlib is imported only when --plot asks for it (it is slow to import).
    from agents.plots import plot_episode_info, write_png

    if set(trace) == {"state_norm"}:
        print(f"note: the {core} core reports no module diagnostics; {path} shows the hidden-state norm only")
    figure = plot_episode_info(trace, title, episode=episode, episodes=episodes)
    return _write_output(path, lambda temp: write_png(figure, temp), overwrite)


def _jsonable(value: Any) -> Any:
    """JSON fallback for numpy scalars and paths in the report."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
