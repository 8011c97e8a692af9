"""Adaptation measures: how fast a (pre-trained) agent learns a held-out task, from its fine-tuning run.

Small pure functions over arrays (as rliable's), so that they can be checked on hand-computed
curves and called from a notebook; no torch. The input is a fine-tuning run's learning curve,
one point per rollout (``metrics.jsonl``):

- ``frames[i]``: the run's frame count after rollout i (increasing, the last one the budget);
- ``values[i]``: the mean return of the episodes that *finished* during rollout i
  (``rollout/ep_return_rollout``), nan when none finished.

The measures read that curve in **windows** of a fixed number of frames (``finetune.window_frames``,
the same for every fine-tuning rule), :func:`window_curve`: a window's value is the mean return of
every episode that finished in it (each rollout weighted by its episode count). Per rollout, a rule
with short rollouts (the meta rule's 32 steps against PPO's 128) would be measured on points of a
few episodes each, whose noise crosses a threshold far sooner; and the first rollouts would hold
only the episodes short enough to have ended, the quick successes. A window of at least
``n_envs x max_steps`` frames sees every env end an episode.

**A window (or rollout) in which no episode finished** carries the value of the last one that had one
(the best estimate of the policy's return is still the last one measured); **before the first
finished episode** it counts as ``initial`` (0 by default: on the sparse-reward MiniGrid tasks a
failed episode scores 0, and an agent none of whose episodes has ended has not reached the goal,
which would have ended the episode). :func:`fill_curve` applies that rule; every measure below
uses it.

Measures (each one number per run, so a study aggregates them over runs with rliable):

- :func:`area_under_curve`: the mean return over the fine-tuning budget, each point's (window's)
  value weighted by the frames it covers (equal windows: the plain mean). Higher = adapted earlier and better.
- :func:`frames_to_threshold`: the frames at the end of the first point (window) whose value reaches
  ``threshold`` (None: never within the budget; a study counts it as the budget, a lower bound).
- :func:`zero_shot_return`: the mean return of a fixed number of evaluation episodes of the
  pre-trained agent on the held-out task, before any update.
- :func:`final_return`: the mean of the last points' values (the end of the curve).

:func:`read_curve` reads ``(frames, values)`` from a run directory; :func:`build_adaptation_report`
writes the report of a ``kind: adaptation`` study (``python study.py report <study>``): the
pre-training return of each model on its training tasks (flagged below ``pretrain.criterion``),
the measures above per fine-tuning row with rliable intervals, and the study's questions answered
with probabilities of improvement.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The per-rollout return the trainer logs: the mean return of the episodes that ended in that rollout.
ROLLOUT_RETURN_KEY = "rollout/ep_return_rollout"


def _curve(frames: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray) -> tuple[np.ndarray,
                                                                                                 np.ndarray]:
    frames_array = np.asarray(frames, dtype=np.float64)
    values_array = np.asarray(values, dtype=np.float64)
    if frames_array.ndim != 1 or frames_array.shape != values_array.shape or frames_array.size == 0:
        raise ValueError(f"frames and values must be non-empty 1-d arrays of one length, got shapes "
                         f"{frames_array.shape} and {values_array.shape}")
    if not np.isfinite(frames_array).all() or frames_array[0] <= 0 or (np.diff(frames_array) <= 0).any():
        raise ValueError("frames must be positive and strictly increasing (the frame count after each rollout)")
    if np.isinf(values_array).any():
        raise ValueError("values must be finite or nan (nan: no episode finished in that rollout)")
    return frames_array, values_array


def fill_curve(values: Sequence[float] | np.ndarray, initial: float = 0.0) -> np.ndarray:
    """Per-rollout values with each nan (a rollout where no episode finished) replaced by the last
    finite value before it, or by ``initial`` before the first one."""
    out = np.asarray(values, dtype=np.float64).copy()
    last = float(initial)
    for i, value in enumerate(out):
        if math.isnan(value):
            out[i] = last
        else:
            last = float(value)
    return out


def area_under_curve(frames: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray,
                     initial: float = 0.0) -> float:
    """Mean return over the budget: ``sum_i v_i * (f_i - f_{i-1}) / f_last`` with ``f_{-1} = 0`` and the
    values filled by :func:`fill_curve` (a rollout with no finished episode carries the last value, 0
    before the first). In return units: 1.0 means every rollout's episodes all scored 1."""
    frames_array, values_array = _curve(frames, values)
    filled = fill_curve(values_array, initial)
    widths = np.diff(frames_array, prepend=0.0)
    return float(np.sum(filled * widths) / frames_array[-1])


def frames_to_threshold(frames: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray,
                        threshold: float) -> int | None:
    """The frame count after the first rollout whose finished episodes' mean return is at least
    ``threshold``; None if no rollout reaches it. A rollout with no finished episode never counts
    (it carries an older value, which was below the threshold or the search would have stopped)."""
    frames_array, values_array = _curve(frames, values)
    reached = np.flatnonzero(np.nan_to_num(values_array, nan=-np.inf) >= threshold)
    return int(frames_array[reached[0]]) if reached.size else None


def zero_shot_return(episode_returns: Sequence[float] | np.ndarray) -> float:
    """Mean return of the evaluation episodes run before any fine-tuning update."""
    returns = np.asarray(episode_returns, dtype=np.float64)
    if returns.ndim != 1 or returns.size == 0 or not np.isfinite(returns).all():
        raise ValueError("zero-shot return needs a non-empty 1-d array of finite episode returns")
    return float(returns.mean())


def final_return(frames: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray,
                 fraction: float = 0.1, initial: float = 0.0) -> float:
    """Mean of the filled values of the last ``fraction`` of the rollouts (at least one)."""
    _, values_array = _curve(frames, values)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    filled = fill_curve(values_array, initial)
    count = max(1, math.ceil(fraction * filled.size))
    return float(filled[-count:].mean())


def window_curve(frames: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray,
                 episodes: Sequence[float] | np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """A per-rollout curve regrouped into windows of ``window`` frames.

    Rollout i belongs to the window its end ``frames[i]`` falls in (``(0, window]``, ``(window,
    2 window]``, ...); a window's value is the mean return of all the episodes that finished in it,
    ``sum(episodes * values) / sum(episodes)``, nan when none did. A last window cut short by the end
    of the run (a budget that is not a multiple of the window) joins the one before it, so no point
    rests on fewer frames than a window. Returns ``(window ends, values)`` over the windows that hold
    a rollout, the last one ending at the last rollout.
    """
    frames_array, values_array = _curve(frames, values)
    counts = np.asarray(episodes, dtype=np.float64)
    if counts.shape != frames_array.shape or (counts < 0).any() or not np.isfinite(counts).all():
        raise ValueError("episodes must be one finite, non-negative count per rollout")
    if window < 1:
        raise ValueError(f"window must be at least 1 frame, got {window}")
    index = np.ceil(frames_array / window).astype(np.int64) - 1
    last = index[-1]
    if last > 0 and frames_array[-1] < (last + 1) * window:
        index[index == last] = last - 1
    finished = (counts > 0) & ~np.isnan(values_array)
    ends, out = [], []
    for w in np.unique(index):
        mine = (index == w) & finished
        ends.append(float(frames_array[-1]) if w == index[-1] else float((w + 1) * window))
        total = counts[mine].sum()
        out.append(float((counts[mine] * values_array[mine]).sum() / total) if total > 0 else math.nan)
    return np.array(ends, dtype=np.float64), np.array(out, dtype=np.float64)


def read_curve(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(frames, values)`` of a run from its ``metrics.jsonl``: one point per rollout, nan where no
    episode finished (:func:`read_rollouts` without the episode counts)."""
    frames, values, _ = read_rollouts(run_dir)
    return frames, values


def read_rollouts(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(frames, values, episodes)`` of a run from its ``metrics.jsonl``: one point per rollout, the
    mean return of the episodes that finished in it (nan where none did) and how many finished. A row
    logged twice for one frame count (never after train.py's purge on resume, but cheap to guard) keeps
    its last copy.

    :raises ValueError: if the file is missing, empty, or was written before the trainer logged
        ``rollout/ep_return_rollout`` (a run whose curve cannot be read this way).
    """
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    by_frames: dict[int, float] = {}
    counts: dict[int, int] = {}
    has_key = had_episodes = False
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a partial last line of a killed run
        if not isinstance(row, dict) or not isinstance(row.get("frames"), int):
            continue
        episodes = row.get("rollout/episodes") or 0
        value = row.get(ROLLOUT_RETURN_KEY)
        has_key, had_episodes = has_key or value is not None, had_episodes or bool(episodes)
        by_frames[row["frames"]] = float(value) if episodes and value is not None else math.nan
        counts[row["frames"]] = int(episodes) if value is not None else 0
    if not by_frames:
        raise ValueError(f"{path}: no metrics rows")
    if had_episodes and not has_key:
        raise ValueError(f"{path}: written before the trainer logged {ROLLOUT_RETURN_KEY}; its per-rollout "
                         "returns cannot be read")
    frames = sorted(by_frames)
    return (np.array(frames, dtype=np.float64), np.array([by_frames[f] for f in frames], dtype=np.float64),
            np.array([counts[f] for f in frames], dtype=np.float64))


# -- the report of an adaptation study ---------------------------------------------------------------


@dataclasses.dataclass
class FinetuneRecord:
    """One finished fine-tuning run and its measures."""

    label: str
    task: str
    seed: int
    frames: np.ndarray
    values: np.ndarray
    auc: float
    frames_to_threshold: int | None
    final: float
    provenance: str


def load_finetunes(study: Any, directory: Path) -> tuple[dict[str, list[FinetuneRecord]], list[str]]:
    """The finished fine-tuning runs of an adaptation study by row label, and the unfinished ones (keys).

    :raises StudyError: a finished run whose learning curve cannot be read (:func:`read_rollouts`).
    """
    from agents.study import StudyError, code_versions, finetune_plan, job_state, read_provenance
    from envs.names import short_env_name

    spec = study.adaptation
    records: dict[str, list[FinetuneRecord]] = {run.label: [] for run in spec.runs}
    missing = []
    for job in finetune_plan(study, directory):
        state = job_state(job)
        if not state.done:
            progress = f"trained to {state.trained_frames:,} frames" if state.started else "not started"
            missing.append(f"{job.key} ({progress})")
            continue
        label = job.model.split("/")[0]
        task = next(t for t in spec.tasks if short_env_name(t) == job.model.split("/", 1)[1])
        try:
            frames, values = window_curve(*read_rollouts(job.run_dir), spec.window_frames)
        except ValueError as exc:  # a finished run whose metrics.jsonl is gone or predates the per-rollout curve
            raise StudyError(f"fine-tuning run {job.key}: {exc}") from None
        provenance = read_provenance(Path(job.run_dir)) or {}
        versions = " then ".join(code_versions(provenance)) or "unknown"
        reached = frames_to_threshold(frames, values, spec.threshold)
        if reached is not None:  # the last window ends at the last rollout, past the budget: not later than never
            reached = min(reached, spec.total_frames)
        records[label].append(FinetuneRecord(
            label, task, job.seed, frames, values, area_under_curve(frames, values), reached,
            final_return(frames, values),
            f"config {str(provenance.get('config_sha256') or 'unknown')[:12]}, code {versions}"))
    return records, missing


def _matrix(records: list[FinetuneRecord], tasks: Sequence[str], measure: str,
            budget: int) -> tuple[np.ndarray, list[int]]:
    """``(runs, tasks)`` of one measure over the seeds that finished every task (frames to threshold:
    a run that never reached it counts as the budget, a lower bound on its time)."""
    by_seed: dict[int, dict[str, float]] = {}
    for r in records:
        value = getattr(r, measure)
        if measure == "frames_to_threshold":
            value = float(budget if value is None else value)
        by_seed.setdefault(r.seed, {})[r.task] = float(value)
    seeds = sorted(s for s, row in by_seed.items() if all(t in row for t in tasks))
    return np.array([[by_seed[s][t] for t in tasks] for s in seeds], dtype=np.float64).reshape(len(seeds),
                                                                                                len(tasks)), seeds


FINETUNE_SCORES_FILE = "finetune_scores.csv"
FINETUNE_MEASURES = ("auc", "frames_to_threshold", "final")  # per fine-tuning run and task; the report's measures
FINETUNE_COLUMNS = ("run", "seed", "task", *FINETUNE_MEASURES, "budget")


def finetune_scores_csv(finetunes: dict[str, list[FinetuneRecord]], tasks: Sequence[str], budget: int) -> str:
    """Every finished fine-tuning run's measures as CSV text, one row per run and task: ``run`` (the row
    label), ``seed``, ``task``, ``auc`` (area under the curve), ``frames_to_threshold`` (empty: never
    reached within the budget), ``final``, ``budget`` (the fine-tuning frames, which a run that never reached
    the threshold counts as). Rows go task by task in ``tasks``' order (the report's columns), then run and
    seed; floats in full (``repr``): :func:`read_finetune_scores_csv` gives back the report's matrices to the
    bit."""
    from agents.report import csv_text

    rows = [[label, r.seed, r.task, repr(float(r.auc)), "" if r.frames_to_threshold is None else r.frames_to_threshold,
             repr(float(r.final)), budget]
            for task in tasks  # task by task, so a reader's columns come out in the report's order
            for label, records in finetunes.items()
            for r in sorted((r for r in records if r.task == task), key=lambda r: r.seed)]  # _matrix's seed order
    return csv_text(FINETUNE_COLUMNS, rows)


def read_finetune_scores_csv(path: str | Path, measure: str = "auc") -> dict[str, np.ndarray]:
    """``{run: array(runs, tasks)}`` of one measure (``auc``, ``frames_to_threshold`` or ``final``) from an
    adaptation study's ``finetune_scores.csv``: the matrices a finished study's report computes its statistics
    from (rows: the seeds that finished every task of the file, in order; columns: the tasks in the file's
    order; frames to threshold counts a run that never reached it as the budget, a lower bound).

    :raises ValueError: an unknown measure, or a file that is not such a CSV (one line naming it).
    """
    from agents import report as rp

    if measure not in FINETUNE_MEASURES:
        raise ValueError(f"measure {measure!r}: one of {', '.join(FINETUNE_MEASURES)}")
    rows = rp.read_csv_rows(path, FINETUNE_COLUMNS, FINETUNE_SCORES_FILE)
    try:
        parsed = [(r["run"], int(r["seed"]), r["task"],
                   float(r[measure] or r["budget"]) if measure == "frames_to_threshold" else float(r[measure]))
                  for r in rows]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: not a study's {FINETUNE_SCORES_FILE} ({error})") from None
    tasks = list(dict.fromkeys(task for _, _, task, _ in parsed))
    values: dict[str, dict[int, dict[str, float]]] = {}
    for label, seed, task, value in parsed:
        values.setdefault(label, {}).setdefault(seed, {})[task] = value
    return rp.score_matrices(values, tasks, tasks)


def mean_frames_text(frames: Sequence[int | None], budget: int) -> str:
    """One seed's frames to threshold averaged over tasks, as the per-seed table prints it: ``> budget`` when
    no task reached the threshold, ``>= mean`` (a lower bound, the budget standing in for a task that never
    reached it) when some did not, else the mean."""
    if all(f is None for f in frames):
        return f"> {budget:,}"
    mean = int(np.mean([budget if f is None else f for f in frames]))
    return (">= " if None in frames else "") + f"{mean:,}"


def build_adaptation_report(directory: Path, root: str | Path, split_versions: bool = False,
                            reps: int = 10_000, loaded: tuple[Any, tuple[dict[str, list[FinetuneRecord]], list[str]]]
                            | None = None) -> str:
    """The markdown of an adaptation study's report (and its PNGs in ``<study dir>/plots/``).

    :param loaded: the pre-training results (:func:`agents.report.load_results`) and :func:`load_finetunes`'
        answer, when the caller read them already (to write the scores files from the same runs).

    :raises StudyError: nothing finished yet, or (without ``split_versions``) runs of one model from
        different code or configs (as :func:`agents.report.load_results`).
    """
    from agents import report as rp
    from agents.study import StudyError, load_study_dir
    from envs.names import short_env_name

    study = load_study_dir(directory)
    spec = study.adaptation
    pre, (finetunes, ft_missing) = loaded or (rp.load_results(directory, root, split_versions=split_versions),
                                              load_finetunes(study, directory))
    small = min(reps, rp.SMALL_REPS)
    train_cols = [i for i, h in enumerate(pre.held_out) if not h]
    held_names = [short_env_name(t) for t in spec.tasks]
    held_cols = [pre.envs.index(n) for n in held_names if n in pre.envs]
    final = {m: s for m, s in pre.scores().items() if len(s)}
    if not final:
        raise StudyError(f"{directory}: no pre-training run has finished its evaluation yet; nothing to report")

    lines = [f"# Adaptation study: {study.name}", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines += [f"Generated by `python study.py report {study.name}` on {when} from the finished runs; nothing here "
              "is written by hand.", ""]

    # Protocol.
    ppo = ", ".join(f"`{o.removeprefix('algo.')}`" for o in spec.ppo) or "PPO's defaults"
    lines += ["## Protocol", "",
              f"- **Pre-training**: every model trains on {', '.join(f'`{t}`' for t in spec.train_tasks)} for "
              f"{study.total_frames:,} frames; seeds {rp._seed_text(study.seeds)} ({len(study.seeds)} per model). "
              f"At the end each run is evaluated with `evaluate.py --seed {study.eval.seed}` (sampled actions), "
              f"{spec.episodes} episodes per env, on its training tasks (the pre-training return; a model whose "
              f"mean over runs is below the criterion {spec.criterion:g} is flagged) and on the held-out tasks "
              "(the zero-shot return, before any update).",
              f"- **Fine-tuning** on the held-out {', '.join(f'`{t}`' for t in spec.tasks)} for "
              f"{spec.total_frames:,} frames, seed s of a row starting from the weights of seed s of its model. "
              f"Rule `ppo`: plain PPO on all parameters with a fresh optimiser and the same settings for every "
              f"model ({ppo}; nothing of the pre-training algorithm carries over); rule `meta`: the model's own "
              "meta_ppo rule (fast/slow groups) with the held-out task as its only task; `scratch`: the same "
              "architecture and rule from random weights.",
              "- **Measures**, from each fine-tuning run's curve in windows of "
              f"{spec.window_frames:,} frames, the same for every rule (the mean return of the episodes that "
              "finished in each window; a window in which no episode finished carries the last window's value, "
              "and counts 0 before the first finished episode): *area under the curve* = the mean return over the "
              "budget (each window weighted by its frames); *frames to threshold* = the frames at the end of the "
              f"first window whose episodes' mean return reaches {spec.threshold:g} (a run that never does counts "
              "as the whole budget, a lower bound, and the table says how many did); *zero-shot* = the pre-trained "
              "model's evaluation return on the held-out task; *final* = the mean of the last 10% of the windows.",
              rp.statistics_protocol(reps, "runs x tasks", "a fine-tuning row's seed s starts from its model's "
                                     "seed s, and every row's seed s meets the same evaluation levels",
                                     secondary=" (frames to threshold, a secondary measure censored at the "
                                     "budget, by the P(X > Y) interval and its test alone)",
                                     family="every pair the questions compare, once"),
              "- Smallest detectable difference (the questions). " + rp.detectable_protocol(
                  "area under the curve per run (mean over tasks)"), ""]
    rows = [[m.label, f"`{rp._short_path(m.config)}`", " ".join(f"`{o}`" for o in m.overrides) or "-",
             str(sum(r.finished for r in pre.runs.get(m.label, [])))] for m in study.models]
    lines += rp._table(["model", "config", "overrides", "finished pre-training runs"], rows)
    rows = [[r.label, r.source, r.rule, "random" if r.scratch else f"pre-trained {r.source}",
             str(len(finetunes[r.label]))] for r in spec.runs]
    lines += rp._table(["fine-tuning run", "model", "rule", "initial weights", "finished runs"], rows)
    missing = [*pre.missing, *ft_missing]
    if missing:
        lines += [f"Not included (unfinished or failed): {'; '.join(missing)}.", ""]

    # Pre-training.
    train_scores = {m: s[:, train_cols] for m, s in final.items()}
    estimates = rp.interval_estimates(train_scores, reps=reps)
    below: set[str] = set()
    rows = []
    for m, scores in train_scores.items():
        per_run = scores.mean(axis=1)
        flag = estimates[m]["mean"][0] < spec.criterion
        if flag:
            below.add(m.split("@")[0])
        rows.append([m, str(len(scores)), rp._ci(estimates[m]["iqm"]), rp._ci(estimates[m]["mean"]),
                     " / ".join(rp._fmt(float(v)) for v in scores.mean(axis=0)),
                     f"{int(np.sum(per_run < spec.criterion))}/{len(per_run)}",
                     "**below the criterion**" if flag else "reached"])
    train_names = " / ".join(pre.envs[i] for i in train_cols)
    lines += ["## Pre-training: return on the training tasks", "",
              f"Evaluation return at the end of pre-training on the training tasks; criterion {spec.criterion:g} "
              "(mean over runs). A model below it has not learned its tasks, and what its fine-tuning rows "
              "measure is not what pre-training gives.", ""]
    lines += rp._table(["model", "runs", "IQM [95% CI]", "mean [95% CI]", f"mean per task ({train_names})",
                        "runs below criterion", "criterion"], rows)

    # Fine-tuning measures.
    measures: dict[str, dict[str, np.ndarray]] = {measure: {} for measure in FINETUNE_MEASURES}
    matrix_seeds: dict[str, list[int]] = {}  # the seeds in a row's matrices (those that finished every task)
    for run in spec.runs:
        for measure in measures:
            matrix, matrix_seeds[run.label] = _matrix(finetunes[run.label], spec.tasks, measure, spec.total_frames)
            if len(matrix):
                measures[measure][run.label] = matrix
    zero_shot: dict[str, np.ndarray] = {}
    for run in spec.runs:
        if not run.scratch and run.source in final and held_cols:
            zero_shot[run.label] = final[run.source][:, held_cols]
    labels = list(measures["auc"])
    ci = {name: rp.interval_estimates(values, reps=reps) if values else {} for name, values in
          (*measures.items(), ("zero_shot", zero_shot))}
    rows = []
    for run in spec.runs:
        if run.label not in measures["auc"]:
            rows.append([run.label, run.source + (" (below criterion)" if run.source in below else ""), run.rule,
                         "0", "-", "-", "-", "-", "-"])
            continue
        # Counted over the runs the IQM is over: a seed that missed a task is out of the matrix.
        records = [r for r in finetunes[run.label] if r.seed in matrix_seeds[run.label]]
        reached = sum(r.frames_to_threshold is not None for r in records)
        rows.append([run.label, ("scratch " if run.scratch else "") + run.source +
                     (" (**below criterion**)" if run.source in below and not run.scratch else ""), run.rule,
                     str(len(measures["auc"][run.label])), rp._ci(ci["auc"][run.label]["iqm"]),
                     rp._ci(ci["auc"][run.label]["mean"]),
                     f"{_frames_ci(ci['frames_to_threshold'][run.label]['iqm'])} ({reached}/{len(records)} reached)",
                     rp._ci(ci["zero_shot"][run.label]["mean"]) if run.label in zero_shot else "- (random weights)",
                     rp._ci(ci["final"][run.label]["mean"])])
    lines += ["## Fine-tuning on the held-out tasks", "",
              "Per row: runs x tasks. Higher area and zero-shot are better; fewer frames to threshold are better.", ""]
    lines += rp._table(["run", "from", "rule", "runs", "area IQM [95% CI]", "area mean [95% CI]",
                        f"frames to {spec.threshold:g}, IQM [95% CI]", "zero-shot mean [95% CI]",
                        "final mean [95% CI]"], rows)

    # The questions.
    pois: dict[tuple[str, str], tuple[float, float, float]] = {}
    lines += ["## The questions", ""]
    if not spec.questions:
        lines += ["The study file asks none.", ""]
    compared = [(x, y) for question in spec.questions for x in question.x for y in question.y
                if x in measures["auc"] and y in measures["auc"]]
    compared = list(dict.fromkeys(compared))
    area_p_values = {(x, y): rp.poi_permutation_p(measures["auc"][x], measures["auc"][y]) for x, y in compared}
    # Fewer frames is better: P(X > Y) on the negated frames is P(X reaches it sooner).
    speed_p_values = {(x, y): rp.poi_permutation_p(-measures["frames_to_threshold"][x],
                                                   -measures["frames_to_threshold"][y]) for x, y in compared}
    # Each measure's tests form one family for Holm's correction: each pair once (x against y and y against x are
    # one two-sided test), with at least two runs a side (with one, no claim is made).
    def family_key(x: str, y: str) -> tuple[str, ...]:
        return tuple(sorted((x, y)))

    in_family = list(dict.fromkeys(family_key(x, y) for x, y in compared
                                   if min(len(measures["auc"][x]), len(measures["auc"][y])) >= 2))
    first_asked = {family_key(x, y): (x, y) for x, y in reversed(compared)}
    area_family = rp.holm_family({key: area_p_values[first_asked[key]] for key in in_family})
    speed_family = rp.holm_family({key: speed_p_values[first_asked[key]] for key in in_family})
    if len(in_family) > 1:
        lines += [f"Holm-adjusted p: each measure's permutation tests over the {len(in_family)} comparisons the "
                  "questions ask (each pair once, two runs a side at least), corrected as one family.", ""]
    for question in spec.questions:
        lines += [f"### {question.text}", ""]
        rows, answers = [], []
        for x in question.x:
            for y in question.y:
                if x not in measures["auc"] or y not in measures["auc"]:
                    rows.append([x, y, "- (no finished runs)", "-", "-", "-"])
                    continue
                area = rp.poi_interval(measures["auc"][x], measures["auc"][y], reps=reps)
                area_p, speed_p = area_p_values[x, y], speed_p_values[x, y]
                # Per run (mean over tasks), as the generalisation report's held-out return per run.
                area_x, area_y = measures["auc"][x].mean(axis=1), measures["auc"][y].mean(axis=1)
                detectable = rp.detectable_difference(area_x, area_y)
                frames_x, frames_y = -measures["frames_to_threshold"][x], -measures["frames_to_threshold"][y]
                speed = rp.poi_interval(frames_x, frames_y, reps=reps)
                pois[x, y] = area
                difference = rp.mean_difference_interval(area_x, area_y)
                area_holm, speed_holm = area_family.get(family_key(x, y)), speed_family.get(family_key(x, y))
                rows.append([x, y, f"{rp._poi_ci(area)}, p {rp.p_text(area_p)}{_holm_cell(area_holm)}",
                             f"{rp._poi_ci(speed)}, p {rp.p_text(speed_p)}{_holm_cell(speed_holm)}",
                             rp._signed_ci_around_zero(difference, 3), rp._fmt_nonzero(detectable, 3)])
                # A from-scratch row does not depend on pre-training: only pre-trained sources can be flagged.
                flagged = [spec.run(r).source for r in (x, y)
                           if spec.run(r).source in below and not spec.run(r).scratch]
                caveat = f" (but {', '.join(sorted(set(flagged)))} did not reach the pre-training criterion)" \
                    if flagged else ""
                if not math.isfinite(detectable):  # one run on a side: intervals of no width support nothing
                    answers.append(f"{x} against {y}: too few runs to compare (smallest detectable difference "
                                   f"unknown (fewer than two runs)): no claim is made{caveat}")
                    continue
                # The area answers by the generalisation report's rule (IQM intervals and P(improvement) both);
                # frames to threshold, a secondary measure often censored at the budget, by P(improvement) and its test.
                area_answer = rp.conclusion(x, y, ci["auc"][x]["iqm"], ci["auc"][y]["iqm"], area, detectable,
                                            where="", per_run="mean area", p_value=area_p, difference=difference,
                                            family=area_holm)
                answers.append(f"area under the curve: {area_answer}{caveat}")
                sooner = rp.verdict(x, y, speed, speed_p, family=speed_holm)
                sooner = sooner.replace("improves on", "reaches the threshold sooner than")
                sooner = sooner.replace("does worse than", "reaches it later than")
                answers.append(f"frames to threshold (by P(improvement) and its permutation test): {sooner}")
        lines += rp._table(["X", "Y", "P(area X > area Y) [95% CI], permutation test p (Holm-adjusted)",
                            "P(X reaches the threshold sooner) [95% CI], permutation test p (Holm-adjusted)",
                            "mean area X - Y [95% Welch t CI]", "smallest detectable difference in mean area"], rows)
        lines += [f"- {a}." for a in answers] or ["- No comparison: runs missing."]
        lines += [""]

    # Per seed.
    lines += ["## Per seed", "", "Area under the curve / frames to threshold (`>` budget: never reached; `>=`: "
              "some tasks never reached, counted as the budget, so a lower bound) per fine-tuning run, averaged "
              f"over tasks. Every fine-tuning run's measures per task, unrounded, are in [{FINETUNE_SCORES_FILE}]"
              f"({FINETUNE_SCORES_FILE}), and the pre-training runs' evaluation scores in [{rp.SCORES_FILE}]"
              f"({rp.SCORES_FILE}) (`agents.adaptation.read_finetune_scores_csv` and "
              "`agents.report.read_scores_csv` read them back into the arrays these statistics are computed from).",
              ""]
    seeds = sorted({r.seed for rs in finetunes.values() for r in rs})
    rows = []
    for seed in seeds:
        row = [str(seed)]
        for label in labels:
            mine = [r for r in finetunes[label] if r.seed == seed]
            if not mine:
                row.append("-")
                continue
            text = mean_frames_text([r.frames_to_threshold for r in mine], spec.total_frames)
            row.append(f"{np.mean([r.auc for r in mine]):.2f} / {text}")
        rows.append(row)
    lines += rp._table(["seed", *labels], rows)
    provenances = {label: sorted({r.provenance for r in finetunes[label]}) for label in labels}
    mixed = [label for label, p in provenances.items() if len(p) > 1]
    if mixed:
        lines += [f"**Fine-tuning runs of {', '.join(mixed)} come from different code or configs**: "
                  f"{'; '.join(f'{m}: {provenances[m]}' for m in mixed)}. Compare with care.", ""]

    lines += rp.provenance_lines(study, directory)
    area_adjusted = {pair: area_family[family_key(*pair)][0] for pair in pois if family_key(*pair) in area_family}
    figures = _write_plots(directory, study, finetunes, ci["auc"], pois, area_p_values, small, area_adjusted)
    lines += ["## Plots", "", *(f"![{name}](plots/{name}.png)" for name in figures), ""]
    return "\n".join(lines)


def _holm_cell(family: tuple[float, int] | None) -> str:
    """A table cell's Holm-adjusted p after the raw one ("" for a pair outside the family)."""
    from agents.report import p_text

    return "" if family is None else f" (Holm {p_text(family[0])})"


def _frames_ci(triple: tuple[float, float, float]) -> str:
    return f"{triple[0]:,.0f} [{triple[1]:,.0f}, {triple[2]:,.0f}]"


def _step_curve(frames: np.ndarray, values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The filled per-rollout curve read at ``grid`` frames (the value of the last rollout ended by then)."""
    filled = fill_curve(values)
    index = np.searchsorted(frames, grid, side="right") - 1
    return np.where(index >= 0, filled[np.clip(index, 0, None)], 0.0)


def _write_plots(directory: Path, study: Any, finetunes: dict[str, list[FinetuneRecord]],
                 auc: dict[str, dict[str, tuple[float, float, float]]],
                 pois: dict[tuple[str, str], tuple[float, float, float]], p_values: dict[tuple[str, str], float],
                 reps: int, adjusted: dict[tuple[str, str], float]) -> list[str]:
    """Fine-tuning curves, the area's interval estimates and the questions' probabilities of improvement (with
    their raw and Holm-adjusted p-values)."""
    from matplotlib.figure import Figure

    from agents.plots import plot_probability_of_improvement, save_figure_atomic
    from agents.report import ALPHA

    spec = study.adaptation
    folder = directory / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    labels = [run.label for run in spec.runs if finetunes[run.label]]

    def save(name: str, figure: Figure) -> None:
        save_figure_atomic(figure, folder / f"{name}.png")
        written.append(name)

    grid = np.linspace(0, spec.total_frames, 101)[1:]
    rng = np.random.default_rng(0)
    figure = Figure(figsize=(7.5, 4.5))
    ax = figure.add_subplot(1, 1, 1)
    for i, label in enumerate(labels):
        curves = np.array([_step_curve(r.frames, r.values, grid) for r in finetunes[label]])
        mean_curve = curves.mean(axis=0)
        # A 95% percentile bootstrap band of the mean over runs (runs resampled with replacement).
        draws = rng.integers(0, len(curves), size=(min(reps, 1000), len(curves)))
        means = curves[draws].mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5], axis=0)
        style = "--" if spec.run(label).scratch else ":" if spec.run(label).rule == "meta" else "-"
        ax.plot(grid, mean_curve, style, color=f"C{i}", label=f"{label} ({len(curves)})")
        ax.fill_between(grid, low, high, color=f"C{i}", alpha=0.15)
    ax.axhline(spec.threshold, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel(f"fine-tuning frames on {', '.join(spec.tasks)}")
    ax.set_ylabel("mean return of the rollout's episodes")
    ax.set_title("Fine-tuning curves (mean over runs, 95% bootstrap band)")
    ax.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    save("finetune_curves", figure)

    if auc:
        figure = Figure(figsize=(9, 0.5 * len(auc) + 1.6))
        for k, stat in enumerate(("iqm", "mean")):
            ax = figure.add_subplot(1, 2, k + 1)
            for i, label in enumerate(auc):
                point, low, high = auc[label][stat]
                ax.errorbar(point, i, xerr=[[point - low], [high - point]], fmt="o", capsize=5,
                            color=f"C{labels.index(label)}")
            ax.set_yticks(range(len(auc)), list(auc) if k == 0 else [""] * len(auc))
            ax.set_ylim(-0.6, len(auc) - 0.4)
            ax.margins(x=0.1)
            ax.grid(axis="x", alpha=0.3)
            ax.set_title(f"{'IQM' if stat == 'iqm' else 'Mean'} area under the curve (95% CI)")
            ax.set_xlabel("mean return over the fine-tuning budget")
        figure.tight_layout()
        save("area_interval_estimates", figure)

    if pois:
        save("probability_of_improvement", plot_probability_of_improvement(
            pois, labels, "probability of improvement of the area under the curve (95% CI)", p_values, ALPHA, adjusted))
    return written


__all__ = ["FINETUNE_SCORES_FILE", "ROLLOUT_RETURN_KEY", "FinetuneRecord", "area_under_curve",
           "build_adaptation_report", "fill_curve", "final_return", "finetune_scores_csv", "frames_to_threshold",
           "load_finetunes", "read_curve", "read_finetune_scores_csv", "read_rollouts", "window_curve",
           "zero_shot_return"]
