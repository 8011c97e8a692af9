"""A study's statistics, plots and ``report.md``, from finished runs (no training, no torch).

Statistics follow rliable (Agarwal et al. 2021, "Deep RL at the edge of the statistical
precipice") and are small pure functions over score arrays of shape ``(runs, envs)``:

- :func:`iqm` and :func:`mean` of all runs x envs; :func:`interval_estimates` gives them with 95%
  stratified bootstrap intervals (runs resampled with replacement within each env);
- :func:`probability_of_improvement` P(X > Y) (Mann-Whitney, averaged over envs) and its interval
  (:func:`poi_interval`, the bootstrap resamples runs of X and Y independently);
- :func:`performance_profile`: the fraction of runs x envs scoring above each threshold tau, with
  intervals;
- :func:`sample_sd` (ddof=1) and :func:`smallest_detectable_difference`, the difference in mean
  a two-sided Welch t-test on these many runs could detect with 80% power at the 5% level, given
  the observed seed-to-seed spread (:func:`detectable_difference`: the same from two arrays of
  per-run scores; the adaptation report uses it too), and :func:`mean_difference_interval`, the
  difference in mean with its Welch t interval: the differences the runs leave possible.

rliable (and its bootstrap library ``arch``) is imported inside the functions that need it.

The report's conclusions (:func:`conclusion`, :func:`conclude`) follow mechanically from the
intervals: an improvement on an LSTM baseline is claimed only when the IQM intervals do not overlap,
the P(improvement) interval excludes 0.5 and its permutation test rejects P = 0.5 at the 5% level;
otherwise the sentence says what does not separate and gives the interval of the difference in mean
(what the runs leave possible) and the smallest difference the seeds could detect. A claim resting on a
permutation test also says whether it survives Holm's correction (:func:`holm_adjusted`) over the
report's family of comparisons.

``load_scores(study)`` returns ``{model: array(runs, envs)}`` for a notebook; ``write_report``
writes ``studies/<study>/report.md``, its PNG plots and ``scores.csv`` (every run's scores, unrounded, which
:func:`read_scores_csv` turns back into those arrays without the runs); :func:`publish` writes the results page
(``docs/results.md``) from finished studies' reports, refusing unfinished or mixed-version studies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from agents.adaptation import FINETUNE_SCORES_FILE, build_adaptation_report, finetune_scores_csv, load_finetunes
from agents.config import load_written_yaml
from agents.study import (
    DEFAULT_ROOT,
    Study,
    StudyError,
    code_versions,
    config_hash,
    eval_path,
    has_eval,
    job_state,
    load_study_dir,
    plan,
    point_settings,
    read_json,
    read_provenance,
    resolved_config,
    run_dir,
    short_commit,
    study_dir,
)

CONFIDENCE = 0.95
REPS = 10_000
# Resamples for per-env and per-point intervals and performance profiles (many of each in a report);
# 2,000 as in rliable's own examples.
SMALL_REPS = 2_000
MAX_RELABELLINGS = 200_000  # a permutation test up to this many relabellings is exact
# Named in a published study's banner entry; bump it when the same runs would give other numbers or
# verdicts (2: 2026-12-05, the permutation test, 10,000 P(improvement) resamples, per-model bootstrap
# seeds; 3: 2026-12-06, Welch's df in the smallest detectable difference, the difference in mean with its
# Welch interval, finished runs left out of the statistics named; 4: 2026-12-06, Holm-adjusted p-values over each
# report's family of comparisons, and whether each claim holds family-wise). An entry without it, or with an
# older one, was published by earlier report code.
STATISTICS_VERSION = 4


def _statistics_tag() -> str:
    """How a banner entry names the statistics version (read at call time: tests patch the version)."""
    return f"statistics v{STATISTICS_VERSION}"

STATS_MISSING = 'study reports need rliable, which is not installed: pip install -e ".[stats]"'


def _rliable() -> tuple[Any, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from rliable import library, metrics
    except ImportError:
        raise StudyError(STATS_MISSING) from None
    return library, metrics


def _bootstrap(library: Any, *args: Any, seed: int = 0, **kwargs: Any) -> tuple[dict[str, np.ndarray],
                                                                                dict[str, np.ndarray]]:
    """rliable's ``get_interval_estimates``, reproducible: the same inputs and seed give the same intervals.

    rliable 1.2's stratified bootstrap draws from numpy's global generator (and arch's bootstrap
    from its ``random_state``): both are seeded here and the global state is put back afterwards.
    """
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="random_state is deprecated", category=FutureWarning)
            return library.get_interval_estimates(*args, random_state=np.random.RandomState(seed), **kwargs)
    finally:
        np.random.set_state(state)


# -- statistics: pure functions over (runs, envs) arrays ------------------------------------------


def _check(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty (runs, envs) array, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        # A missing score (an env a run was never evaluated on) must not be trimmed away silently.
        raise ValueError("scores must be finite: a run lacks a score for some env")
    return scores


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean of all runs x envs, as rliable's (``scipy.stats.trim_mean(scores, 0.25)``): the
    mean after cutting ``int(0.25 * n)`` of the n values from each end, so at fewer than four values (three
    seeds on one env) nothing is cut and it is the mean."""
    _, metrics = _rliable()
    return float(metrics.aggregate_iqm(_check(scores)))


def fast_iqm(scores: np.ndarray) -> float:
    """The same number as :func:`iqm` (``scipy.stats.trim_mean(scores, 0.25, axis=None)``), without
    scipy's per-call overhead: the bootstrap calls it tens of thousands of times."""
    values = np.sort(_check(scores), axis=None)
    cut = int(0.25 * values.size)
    return float(values[cut: values.size - cut].mean())


def mean(scores: np.ndarray) -> float:
    """Mean of all runs x envs."""
    return float(np.mean(_check(scores)))


def interval_estimates(score_dict: dict[str, np.ndarray], reps: int = REPS, seed: int = 0,
                       confidence: float = CONFIDENCE) -> dict[str, dict[str, tuple[float, float, float]]]:
    """IQM and mean of each model with stratified bootstrap intervals.

    :param score_dict: ``{model: array(runs, envs)}``.
    :param reps: bootstrap resamples.
    :param seed: seed of the resampling: the same scores give the same interval, whichever other
        models are in ``score_dict``.
    :return: ``{model: {"iqm": (point, low, high), "mean": (point, low, high)}}``.
    """
    library, _ = _rliable()
    scores = {name: _check(value) for name, value in score_dict.items()}

    def aggregate(x: np.ndarray) -> np.ndarray:
        return np.array([fast_iqm(x), float(np.mean(x))])

    estimates = {}
    for name, value in scores.items():
        # One bootstrap per model, each from ``seed``: rliable draws every model's resamples from one
        # stream, so a model's interval would move when another model is added before it.
        points, intervals = _bootstrap(library,
            {name: value}, aggregate, reps=reps, confidence_interval_size=confidence, seed=seed)
        estimates[name] = {stat: (float(points[name][i]), float(intervals[name][0, i]),
                                  float(intervals[name][1, i])) for i, stat in enumerate(("iqm", "mean"))}
    return estimates


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y): for each env the probability that a random run of X beats one of Y (ties count
    half), averaged over envs. 1.0 when every run of X beats every run of Y on every env."""
    _, metrics = _rliable()
    x, y = _check(x), _check(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y need the same envs, got {x.shape[1]} and {y.shape[1]}")
    return float(metrics.probability_of_improvement(x, y))


def _pair_score(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise (broadcast) Mann-Whitney pair score: 1 where ``a`` beats ``b``, 0.5 on a tie, else 0."""
    return (a > b) + 0.5 * (a == b)


def _wins(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(X > Y) of stacked score arrays ``(..., runs_x, envs)`` and ``(..., runs_y, envs)``: per env the
    share of (run of X, run of Y) pairs that X wins, ties counting half, averaged over envs (rliable's
    ``probability_of_improvement``, U / (n_x n_y) per env, for many resamples at once)."""
    return _pair_score(x[..., :, None, :], y[..., None, :, :]).mean(axis=(-3, -2)).mean(axis=-1)


def _chunks(total: int, cells: int, budget: int = 4_000_000) -> list[slice]:
    """Slices of ``range(total)`` whose items of ``cells`` elements each fit ``budget`` elements at once."""
    step = max(1, budget // max(cells, 1))
    return [slice(start, min(start + step, total)) for start in range(0, total, step)]


def poi_interval(x: np.ndarray, y: np.ndarray, reps: int = REPS, seed: int = 0,
                 confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """P(X > Y) with its percentile bootstrap interval: ``(point, low, high)``.

    The resampling is rliable's ``StratifiedIndependentBootstrap`` (for each env, the runs of X and the
    runs of Y drawn with replacement, independently of each other), vectorised: rliable runs a
    Mann-Whitney test per resample and env (~10 ms a resample), which held the report to 2,000
    resamples and its interval ends to about +-0.01 of where more resamples put them.
    """
    x, y = _check(x), _check(y)
    point = probability_of_improvement(x, y)
    rng = np.random.default_rng(seed)
    (n_x, envs), n_y = x.shape, y.shape[0]
    values = np.empty(reps)
    for part in _chunks(reps, n_x * n_y * envs):
        size = part.stop - part.start
        xs = np.take_along_axis(x[None], rng.integers(n_x, size=(size, n_x, envs)), axis=1)
        ys = np.take_along_axis(y[None], rng.integers(n_y, size=(size, n_y, envs)), axis=1)
        values[part] = _wins(xs, ys)
    low, high = np.percentile(values, [50 * (1 - confidence), 50 * (1 + confidence)])
    return point, float(low), float(high)


def poi_permutation_p(x: np.ndarray, y: np.ndarray, max_relabellings: int = MAX_RELABELLINGS,
                      seed: int = 0) -> float:
    """Two-sided permutation test with P(X > Y) as its statistic: the share of relabellings of the pooled
    runs (a run keeps its row of env scores) whose P(X > Y) lies at least as far from 0.5 as the observed
    one.

    What it tests exactly is that the two models' runs are interchangeable (one distribution of scores),
    which implies P = 0.5; it holds its 5% level at any n under that null (5 against 5 can reach
    p = 2/252 = 0.008 at best). Two models with P = 0.5 but very different spreads and unequal numbers of
    runs (12 tight runs against 3 spread ones: 27%) are rejected more often than 5%; with equal numbers of
    runs, as in a study, only slightly (5-7% at 5 or 10 against as many, one spread ten times the other). The bootstrap interval of :func:`poi_interval` is
    too narrow at a handful of runs per model (percentile intervals undercover; five runs that all beat
    five give [1.00, 1.00]), which is why a claim needs this test as well.

    Exact, over every relabelling, when there are at most ``max_relabellings`` (10 runs against 10:
    184,756); otherwise that many random relabellings (seeded), counted with the observed one.
    """
    x, y = _check(x), _check(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y need the same envs, got {x.shape[1]} and {y.shape[1]}")
    pooled = np.concatenate([x, y])
    runs, n_x = len(pooled), len(x)
    observed = abs(float(_wins(x, y)) - 0.5)
    total = math.comb(runs, n_x)
    exact = total <= max_relabellings
    # P(X > Y) of a relabelling is the mean of pairwise[i, j] over its (X run i, Y run j) pairs:
    # per env the pair's win (ties half), averaged over envs, which commutes with the mean over pairs.
    pairwise = _pair_score(pooled[:, None, :], pooled[None, :, :]).mean(axis=-1)  # (runs, runs)
    if exact:
        import itertools

        combinations = itertools.combinations(range(runs), n_x)
    rng = np.random.default_rng(seed)
    count = total if exact else max_relabellings
    as_far = 0
    for part in _chunks(count, runs):  # a few MB at a time, however many runs
        size = part.stop - part.start
        if exact:
            groups = np.array(list(itertools.islice(combinations, size)), dtype=np.int64).reshape(size, n_x)
        else:
            groups = np.argsort(rng.random((size, runs)), axis=1)[:, :n_x]
        in_x = np.zeros((size, runs))
        np.put_along_axis(in_x, groups, 1.0, axis=1)
        p = ((in_x @ pairwise) * (1.0 - in_x)).sum(axis=1) / (n_x * (runs - n_x))
        as_far += int(np.count_nonzero(np.abs(p - 0.5) >= observed - 1e-12))
    return as_far / total if exact else (as_far + 1) / (max_relabellings + 1)


def holm_adjusted(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values, returned in their order: the i-th smallest
    becomes ``max over j <= i of min(1, (m - j + 1) * p_(j))`` for a family of ``m``. Rejecting where the
    adjusted p is below alpha keeps the chance of any false claim in the family at most alpha, whatever
    the dependence between the tests (a report's comparisons share runs)."""
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"p-values must be a 1-d array in [0, 1], got {p!r}")
    order = np.argsort(p, kind="stable")
    steps = np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order])
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, steps)
    return adjusted


def holm_family(p_values: dict[Any, float]) -> dict[Any, tuple[float, int]]:
    """``{comparison: (Holm-adjusted p, size of the family)}`` for a family given as ``{comparison: p}``."""
    adjusted = holm_adjusted(list(p_values.values())) if p_values else np.array([])
    return {key: (float(value), len(p_values)) for key, value in zip(p_values, adjusted, strict=True)}


def score_distribution(scores: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """The fraction of runs x envs scoring strictly above each tau (rliable's run-score distribution)."""
    scores = _check(scores)
    return np.array([float(np.mean(scores > tau)) for tau in np.asarray(taus, dtype=np.float64)])


def performance_profile(score_dict: dict[str, np.ndarray], taus: np.ndarray, reps: int = 2000, seed: int = 0,
                        confidence: float = CONFIDENCE) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Performance profiles with stratified bootstrap bands: ``{model: (profile, low, high)}`` over ``taus``;
    each model's band from ``seed`` alone, as in :func:`interval_estimates`."""
    library, _ = _rliable()
    taus = np.asarray(taus, dtype=np.float64)
    profiles = {}
    for name, value in score_dict.items():
        points, intervals = _bootstrap(library, {name: _check(value)}, lambda x: score_distribution(x, taus),
                                       reps=reps, confidence_interval_size=confidence, seed=seed)
        profiles[name] = (points[name], intervals[name][0], intervals[name][1])
    return profiles


def sample_sd(values: Sequence[float] | np.ndarray) -> float:
    """Sample standard deviation (ddof=1); nan for fewer than two values."""
    data = np.asarray(values, dtype=np.float64)
    return float(np.std(data, ddof=1)) if data.size >= 2 else float("nan")


def _welch(sd_x: float, n_x: int, sd_y: float, n_y: int) -> tuple[float, float]:
    """The standard error of mean(x) - mean(y) and its Welch-Satterthwaite degrees of freedom
    (inf when both spreads are zero: the difference is then known exactly)."""
    a, b = sd_x**2 / n_x, sd_y**2 / n_y
    if a + b == 0:
        return 0.0, math.inf
    return math.sqrt(a + b), (a + b) ** 2 / (a**2 / (n_x - 1) + b**2 / (n_y - 1))


def smallest_detectable_difference(sd_x: float, n_x: int, sd_y: float, n_y: int, alpha: float = 0.05,
                                   power: float = 0.8) -> float:
    """The smallest difference in mean two groups of runs could detect, from their spread.

    ``(t_{1-alpha/2, df} + t_{power, df}) * sqrt(sd_x^2/n_x + sd_y^2/n_y)`` with Welch's ``df``
    (Welch-Satterthwaite; ``n_x + n_y - 2`` when the groups have equal sizes and spreads): a difference
    this large is found by a two-sided Welch t-test at level ``alpha`` with probability about ``power``.
    Smaller ones can go unseen; it says nothing about which differences these runs exclude (for that,
    :func:`mean_difference_interval`). 0 when both spreads are zero; nan when either group has fewer
    than two runs.
    """
    from scipy import stats

    if n_x < 2 or n_y < 2 or not (math.isfinite(sd_x) and math.isfinite(sd_y)):
        return float("nan")
    spread, df = _welch(sd_x, n_x, sd_y, n_y)
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * spread)


def detectable_difference(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """:func:`smallest_detectable_difference` of two groups of per-run scores (one number per run),
    from their sample SDs and sizes; nan when either group has fewer than two runs."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    return smallest_detectable_difference(sample_sd(x), len(x), sample_sd(y), len(y))


def mean_difference_interval(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray,
                             confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """``mean(x) - mean(y)`` of two groups of per-run scores with its Welch t interval: ``(point, low, high)``.

    The differences these runs are compatible with, where the smallest detectable difference is only what
    they could find: an interval from -0.25 to +0.01 leaves a small advantage of x possible although a
    test would miss it. nan ends when either group has fewer than two runs.
    """
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    point = float(np.mean(x) - np.mean(y)) if len(x) and len(y) else float("nan")
    if len(x) < 2 or len(y) < 2:
        return point, float("nan"), float("nan")
    spread, df = _welch(sample_sd(x), len(x), sample_sd(y), len(y))
    half = float(stats.t.ppf(0.5 + confidence / 2, df) * spread)
    return point, point - half, point + half


# -- reading a study's results ----------------------------------------------------------------------


@dataclasses.dataclass
class RunRecord:
    """One run's evaluation results: ``returns[point]`` is an array over the study's envs (nan: missing)."""

    model: str
    seed: int
    run_dir: Path
    config_sha256: str | None
    versions: list[str]
    returns: dict[int, np.ndarray]
    successes: dict[int, np.ndarray]
    frames: dict[int, int]  # planned point -> frames of the checkpoint evaluated there
    finished: bool

    @property
    def provenance(self) -> str:
        """``config <hash> code <versions>``: what must be equal for runs to be pooled."""
        return f"config {(self.config_sha256 or 'unknown')[:12]}, code {' then '.join(self.versions) or 'unknown'}"


@dataclasses.dataclass
class StudyResults:
    """Everything the report needs, read from a study directory."""

    study: Study
    directory: Path
    envs: list[str]
    held_out: list[bool]
    models: list[str]
    baselines: list[str]
    runs: dict[str, list[RunRecord]]
    missing: list[str]

    def scores(self, point: int | None = None, held_out_only: bool = False) -> dict[str, np.ndarray]:
        """``{model: array(runs, envs)}`` of mean returns at ``point`` (default: the end of the budget),
        over the runs evaluated there, in seed order.

        :raises ValueError: for a ``point`` that is not one of the study's evaluation points.
        """
        point = self._point(point)
        columns = [i for i, h in enumerate(self.held_out) if h or not held_out_only]
        out = {}
        for model in self.models:
            rows = [r.returns[point][columns] for r in self._evaluated(model, point)]
            out[model] = np.array(rows, dtype=np.float64).reshape(len(rows), len(columns))
        return out

    def seeds(self, model: str, point: int | None = None) -> list[int]:
        """The seeds of a model's runs evaluated at ``point`` (the rows of :meth:`scores`)."""
        point = self._point(point)
        return [r.seed for r in self._evaluated(model, point)]

    def _point(self, point: int | None) -> int:
        """``point``, or the end of the budget for None; an unknown point is an error, not empty scores."""
        if point is None:
            return self.study.total_frames
        if point not in self.study.points:
            raise ValueError(f"study {self.study.name} is evaluated at {list(self.study.points)} frames, "
                             f"not at {point}")
        return point

    def _evaluated(self, model: str, point: int) -> list[RunRecord]:
        """A model's runs with a score for every env at ``point``: a run evaluated on fewer envs (the
        study's envs changed since) is left out rather than scored on what it has."""
        return [r for r in self.runs.get(model, []) if point in r.returns and np.isfinite(r.returns[point]).all()]


def _env_order(study: Study, directory: Path) -> tuple[list[str], list[bool]]:
    """The study's envs and which are held out, read from the first result JSON (no gymnasium import)."""
    settings = point_settings(study, study.total_frames)
    for model in study.models:
        for seed in study.seeds:
            run = run_dir(directory, model.label, seed)
            if not has_eval(run, study.total_frames, settings):
                continue  # evaluated with other settings: its envs may not be the study's now
            data = read_json(eval_path(run, study.total_frames))
            if data.get("checkpoints"):
                results = data["checkpoints"][0]["results"]
                names = [r["name"] for r in results]
                if study.eval.suite is not None:
                    return names, [r.get("split") == "held-out" for r in results]
                return names, [name in study.eval.held_out for name in names]
    raise StudyError(f"{directory}: no run has finished its final evaluation yet; nothing to report")


def load_results(study: str | Path, root: str | Path = DEFAULT_ROOT, split_versions: bool = False) -> StudyResults:
    """Read every run of a study (name, directory or study file) and its evaluations.

    :param split_versions: list runs of one model made by different code or configs apart (as
        ``model@<provenance>``) instead of refusing them.
    :raises StudyError: no such study, nothing evaluated yet, or (without ``split_versions``) runs of
        one model that differ in config hash or code version.
    """
    directory = study_dir(study, root)
    spec = load_study_dir(directory)
    envs, held_out = _env_order(spec, directory)
    runs: dict[str, list[RunRecord]] = {}
    missing: list[str] = []
    not_started: dict[str, list[int]] = {}  # model -> seeds: one entry per model, not one per run
    for job in plan(spec, directory):
        record = _read_run(job.model, job.seed, Path(job.run_dir), envs, spec)
        state = job_state(job)
        if not state.done and not state.started:
            not_started.setdefault(job.model, []).append(job.seed)
        elif not state.done:
            progress = f"trained to {state.trained_frames:,} frames"
            if state.evals_missing:
                progress += f", evaluations missing at {', '.join(f'{f:,}' for f in state.evals_missing)}"
            missing.append(f"{job.key} ({progress})")
        if record.returns:
            runs.setdefault(job.model, []).append(record)
    missing += [f"{model} seed{'s' if len(seeds) > 1 else ''} {_seed_text(seeds)} (not started)"
                for model, seeds in not_started.items()]
    models = [m.label for m in spec.models]
    split: dict[str, list[RunRecord]] = {}
    for model in models:
        groups: dict[str, list[RunRecord]] = {}
        for record in runs.get(model, []):
            groups.setdefault(record.provenance, []).append(record)
        if len(groups) > 1 and not split_versions:
            listing = "; ".join(f"{len(v)} run(s) with {k} (seeds {', '.join(str(r.seed) for r in v)})"
                                for k, v in groups.items())
            raise StudyError(f"model {model} mixes runs of different code or configs: {listing}. "
                             f"Rerun them from one version, or pass --split-versions to list them apart")
        for n, group in enumerate(groups.values(), start=1):
            split[model if len(groups) == 1 else f"{model}@{n}"] = group
    labels = [label for model in models for label in split if label == model or label.startswith(f"{model}@")]
    baselines = [label for label in labels if _is_lstm(spec, label.split("@")[0])]
    return StudyResults(spec, directory, envs, held_out, labels, baselines, split, missing)


def _is_lstm(study: Study, label: str) -> bool:
    try:
        return resolved_config(study, study.model(label), study.seeds[0])["core"]["name"] == "lstm"
    except (StudyError, ValueError, OSError):  # a config file gone since the runs: not a known baseline
        return False


def _read_run(model: str, seed: int, directory: Path, envs: list[str], study: Study) -> RunRecord:
    provenance = read_provenance(directory)
    returns: dict[int, np.ndarray] = {}
    successes: dict[int, np.ndarray] = {}
    frames: dict[int, int] = {}
    for point in study.points:
        if not has_eval(directory, point, point_settings(study, point)):
            continue  # not evaluated, or with other settings than the study's now: not comparable
        data = read_json(eval_path(directory, point))
        if not data.get("checkpoints"):
            continue
        checkpoint = data["checkpoints"][0]
        by_name = {r["name"]: r for r in checkpoint["results"]}
        returns[point] = np.array([by_name[e]["mean_return"] if e in by_name else np.nan for e in envs])
        successes[point] = np.array([by_name[e]["success_rate"] if e in by_name and by_name[e]["success_rate"]
                                     is not None else np.nan for e in envs], dtype=np.float64)
        name = Path(checkpoint["checkpoint"]).stem
        frames[point] = int(name.split("_")[-1]) if name.split("_")[-1].isdigit() else point
    config_sha = (provenance or {}).get("config_sha256")
    try:  # what the run really used, if train.py wrote it
        written = load_written_yaml((directory / "config.yaml").read_text())
        config_sha = config_hash(written) if isinstance(written, dict) else config_sha
    except (OSError, ValueError, yaml.YAMLError):  # unreadable: as if absent, the recorded hash stands
        pass
    return RunRecord(model, seed, directory, config_sha, code_versions(provenance), returns, successes, frames,
                     study.total_frames in returns)


def load_scores(study: str | Path, point: int | None = None, held_out_only: bool = False,
                root: str | Path = DEFAULT_ROOT) -> dict[str, np.ndarray]:
    """``{model: array(runs, envs)}``: mean evaluation return per run (rows, seed order) and env
    (columns, the study's env order; ``load_results(study).envs`` names them) at ``point`` frames
    (default: the end of the budget), for a notebook.

    :param held_out_only: keep only the held-out envs' columns.
    :raises ValueError: for a ``point`` that is not one of the study's evaluation points.
    """
    return load_results(study, root).scores(point, held_out_only)


SCORES_FILE = "scores.csv"
SCORES_COLUMNS = ("model", "seed", "env", "held_out", "point", "checkpoint_frames", "mean_return", "success_rate")


def scores_csv(results: StudyResults) -> str:
    """Every run's evaluation scores as CSV text, one row per env, run and evaluation point (the report's
    statistics are computed from these numbers, unrounded; :func:`read_scores_csv` reads them back).

    Columns: ``model, seed, env, held_out`` (1 or 0), ``point`` (the planned frames), ``checkpoint_frames``
    (the checkpoint evaluated there), ``mean_return``, ``success_rate`` (empty where the env has none).
    Floats are written in full (``repr``), so the arrays read back equal the report's to the bit.
    """
    rows = []
    # Env by env (the study's order, so a reader's columns come out in it), then model, run (in the study's seed
    # order, the rows of the report's arrays) and point.
    for j, env in enumerate(results.envs):
        for model in results.models:
            for record in results.runs.get(model, []):
                for point in sorted(record.returns):
                    value, success = record.returns[point][j], record.successes[point][j]
                    if not np.isfinite(value):
                        continue  # not evaluated on this env: no row, as the statistics leave it out
                    rows.append([model, record.seed, env, int(results.held_out[j]), point, record.frames[point],
                                 repr(float(value)), repr(float(success)) if np.isfinite(success) else ""])
    return csv_text(SCORES_COLUMNS, rows)


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """``header`` and ``rows`` as CSV text (``\\n`` line ends, quoted where a field needs it)."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def read_csv_rows(path: str | Path, columns: Sequence[str], name: str) -> list[dict[str, str]]:
    """The rows of a scores CSV (``name``: what it should be, for the message) as dicts of strings.

    :raises ValueError: one line naming the file: unreadable, not UTF-8, no rows, or a column missing.
    """
    import csv

    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{path}: cannot read it as a study's {name} ({error})") from None
    missing = [c for c in columns if not rows or c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: not a study's {name} (" + (f"no column {', '.join(missing)}" if rows else "no rows")
                         + ")")
    return rows


def score_matrices(values: dict[str, dict[int, dict[str, float]]], columns: Sequence[str],
                   required: Sequence[str]) -> dict[str, np.ndarray]:
    """``{model: array(runs, columns)}`` from ``values[model][seed][column]``: one row per seed (in the dicts'
    order) that has a finite value in every ``required`` column, as the report keeps a run only with a score
    everywhere."""
    out = {}
    for model, seeds in values.items():
        kept = [[seeds[seed][c] for c in columns] for seed in seeds
                if all(np.isfinite(seeds[seed].get(c, np.nan)) for c in required)]
        out[model] = np.array(kept, dtype=np.float64).reshape(len(kept), len(columns))
    return out


def read_scores_csv(path: str | Path, point: int | None = None,
                    held_out_only: bool = False) -> dict[str, np.ndarray]:
    """``{model: array(runs, envs)}`` of mean returns at ``point`` (default: the last point in the file) from
    a study's ``scores.csv`` (written beside its report and published beside its plots): the arrays the
    report's statistics are computed from, so ``interval_estimates(read_scores_csv(path, held_out_only=True))``
    recomputes its held-out intervals without the runs. Rows are runs with a score on every env at ``point``,
    in the file's order (the study's seeds as its file lists them); columns are the envs in the file's order
    (the study's).

    :param held_out_only: keep only the held-out envs' columns.
    :raises ValueError: a file that is not such a CSV (one line naming the file and the problem), or a
        ``point`` the file has no scores at.
    """
    rows = read_csv_rows(path, SCORES_COLUMNS, SCORES_FILE)
    try:
        parsed = [(r["model"], int(r["seed"]), r["env"], {"1": True, "0": False}[r["held_out"]], int(r["point"]),
                   float(r["mean_return"])) for r in rows]
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: not a study's {SCORES_FILE} ({error})") from None
    envs = list(dict.fromkeys(env for _, _, env, _, _, _ in parsed))
    held_out = {env: held for _, _, env, held, _, _ in parsed}
    points = sorted({p for *_, p, _ in parsed})
    point = points[-1] if point is None else point
    if point not in points:
        raise ValueError(f"{path} has scores at {points} frames, not at {point}")
    values: dict[str, dict[int, dict[str, float]]] = {}
    for model, seed, env, _, at, value in parsed:
        values.setdefault(model, {}).setdefault(seed, {})  # a model or seed without this point keeps its place
        if at == point:
            values[model][seed][env] = value
    return score_matrices(values, [env for env in envs if held_out[env] or not held_out_only], envs)


# -- report ----------------------------------------------------------------------------------------


def per_env_poi(x: np.ndarray, y: np.ndarray, reps: int = REPS) -> list[str]:
    """P(X > Y) on each env alone, with its interval and permutation p, as table cells. The pooled P
    weighs an env every model fails (all ties: 0.5) as much as one that tells them apart."""
    cells = []
    for k in range(x.shape[1]):
        poi = poi_interval(x[:, [k]], y[:, [k]], reps=reps)
        cells.append(f"{_poi_ci(poi)}, p {p_text(poi_permutation_p(x[:, [k]], y[:, [k]]))}")
    return cells


def statistics_protocol(reps: int, unit: str, runs_share: str, secondary: str = "",
                        family: str = "every model but the LSTM baselines against every baseline") -> str:
    """The protocol's statistics bullet, one text for the generalisation and the adaptation reports.

    :param unit: what the IQM is over ("runs x envs").
    :param runs_share: what two models' runs of the same seed have in common (why they are still
        compared as independent samples).
    :param secondary: a sentence on a measure judged otherwise (the adaptation report's frames to threshold).
    :param family: which comparisons form the family that Holm's correction is over.
    """
    return (f"- Statistics over runs (rliable): IQM and mean over {unit} with {int(CONFIDENCE * 100)}% stratified "
            f"bootstrap intervals ({reps:,} resamples; each model's from the same seed, so an interval does not "
            "depend on the other models in the report); the probability of improvement P(X > Y) (per env the "
            "share of (run of X, run of Y) pairs X wins, ties half, averaged over envs) with its percentile "
            f"bootstrap interval ({reps:,} resamples of X's and Y's runs, independently) and a two-sided "
            "permutation test with P(X > Y) as its statistic (of the null that the two models' runs are "
            "interchangeable; exact over every relabelling of the runs when there are at most "
            f"{MAX_RELABELLINGS:,}, else that many random ones). Comparisons treat two models' runs as independent "
            f"samples: {runs_share}, but no comparison pairs them. A difference is claimed only when the IQM "
            f"intervals are apart, the P(X > Y) interval excludes 0.5 and the permutation test gives p < {ALPHA}"
            f"{secondary}. That rule is per comparison; a report makes several, so each claim resting on a permutation "
            "test also gives its p after Holm's step-down correction over the report's comparisons of that measure "
            f"({family}, with two runs a side at least; per-env p-values are not corrected) and says "
            f"whether it holds at a family-wise {ALPHA} level. A model with a single run has no interval (shown as a "
            "zero-width one).")


def detectable_protocol(score: str) -> str:
    """What the reports' smallest detectable difference is (one text for both reports)."""
    return (f"From the observed seed-to-seed spread of the {score}: the difference in its mean that a two-sided "
            "Welch t-test at the 5% level would detect with 80% power, `(t(0.975, df) + t(0.8, df)) * "
            "sqrt(sd_x^2/n_x + sd_y^2/n_y)` with Welch's df (unknown with fewer than two runs). A guide to what "
            "these seeds resolve, estimated from the same noisy spread; the claim rule (intervals apart) needs "
            "larger differences than the t-test. A smaller true difference can go unseen, and a larger one is "
            "not thereby excluded: the 95% Welch t interval of the difference in mean says which differences "
            "the runs leave possible.")


def _fmt(value: float, digits: int = 2) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _ci(triple: tuple[float, float, float], digits: int = 2) -> str:
    return f"{_fmt(triple[0], digits)} [{_fmt(triple[1], digits)}, {_fmt(triple[2], digits)}]"


def _signed_ci(triple: tuple[float, float, float], digits: int = 2) -> str:
    """A difference with its interval, each number signed: "-0.12 [-0.25, +0.01]"."""
    if not all(math.isfinite(v) for v in triple):
        return _ci(triple, digits)
    return f"{triple[0]:+.{digits}f} [{triple[1]:+.{digits}f}, {triple[2]:+.{digits}f}]"


def _signed_ci_around_zero(difference: tuple[float, float, float], least: int = 2) -> str:
    """:func:`_signed_ci` of a difference with at least ``least`` decimals and as many as print each end on its
    side of 0 (an end at -0.004 is "-0.004", not "-0.00" beside "it holds 0")."""
    return _signed_ci(difference, max(least, _digits_to_tell((difference[1], 0.0), (difference[2], 0.0))))


def _fmt_nonzero(value: float, least: int = 2) -> str:
    """:func:`_fmt` with at least ``least`` decimals and as many as keep a non-zero value from printing as 0."""
    return _fmt(value, max(least, _digits_to_tell((value, 0.0))))


def _poi_ci(poi: tuple[float, float, float]) -> str:
    """A probability of improvement and its interval, with the decimals that show on which side of 0.5 each end
    lies (an end at 0.498 printed as "0.50" would read as touching it)."""
    return _ci(poi, _digits_to_tell((poi[1], 0.5), (poi[2], 0.5)))


def _digits_to_tell(*pairs: tuple[float, float]) -> int:
    """Decimals (2 to 10) that print each pair's two numbers as different numbers when they differ, so a
    verdict resting on an interval end just above 0.5 or just above another interval does not print "0.50",
    nor an end just below 0 "-0.00"."""
    for digits in range(2, 10):
        if all(a == b or not (math.isfinite(a) and math.isfinite(b))
               or float(_fmt(a, digits)) != float(_fmt(b, digits)) for a, b in pairs):
            return digits
    return 10


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|",
            *("| " + " | ".join(row) + " |" for row in rows), ""]


ALPHA = 0.05  # the level of the permutation test a P(improvement) verdict also needs


def p_text(p_value: float, alpha: float = ALPHA) -> str:
    """A p-value with 3 decimals, or with the decimals that keep it on its side of ``alpha``: an exact
    p of 46/924 = 0.0498 counts as p < 0.05 and must not print as "0.050". Below 0.001: "< 0.001" (an exact
    p of 2/184,756 is not "0.000")."""
    if 0 < p_value < 0.001 <= alpha:
        return "< 0.001"
    for digits in range(3, 11):
        text = f"{p_value:.{digits}f}"
        if (float(text) < alpha) == (p_value < alpha):
            return text
    return repr(p_value)


def _poi_words(poi: tuple[float, float, float], p_value: float | None, digits: int) -> tuple[int, str]:
    """Which side of 0.5 a probability of improvement lies (+1, -1 or 0) and how to say it.

    A side needs the interval to exclude 0.5 and, when given, the permutation test to reject
    P = 0.5 at ``ALPHA``: at a few runs per model the bootstrap interval alone is too narrow.
    """
    low, high = poi[1], poi[2]
    numbers = _ci(poi, digits)
    side = 1 if low > 0.5 else -1 if high < 0.5 else 0
    where = "above" if side > 0 else "below"
    if p_value is None:
        return side, f"{numbers} {'contains 0.5' if side == 0 else f'lies {where} 0.5'}"
    if side == 0:
        return 0, f"{numbers} contains 0.5 (permutation test p {p_text(p_value)})"
    if p_value >= ALPHA:
        return 0, (f"{numbers} lies {where} 0.5, but its permutation test does not reject 0.5 "
                   f"(p {p_text(p_value)} >= {ALPHA})")
    return side, f"{numbers} lies {where} 0.5 (permutation test p {p_text(p_value)})"


def family_words(family: tuple[float, int] | None, what: str = "the claim") -> str:
    """What a claim resting on a permutation test becomes after Holm's correction over its family:
    ``family`` is ``(adjusted p, number of comparisons)``; "" for none, or a family of one.

    :param what: what holds or not ("the claim"; "that separation" where one measure of two separates).
    """
    if family is None or family[1] < 2:
        return ""
    adjusted, size = family
    held = "holds" if adjusted < ALPHA else "does not hold"
    return (f"; after Holm's correction for the {size} comparisons of this report p is {p_text(adjusted)}, so "
            f"{what} {held} at a family-wise {ALPHA} level")


def verdict(model: str, baseline: str, poi: tuple[float, float, float], p_value: float | None = None,
            family: tuple[float, int] | None = None) -> str:
    """The sentence a probability of improvement, its interval and (when given) its permutation test's
    p-value support (never more).

    :param family: ``(Holm-adjusted p, comparisons in the family)``: a claim says whether it survives the
        correction (:func:`family_words`).
    """
    side, words = _poi_words(poi, p_value, _digits_to_tell((poi[1], 0.5), (poi[2], 0.5)))
    if side > 0:
        return f"{model} improves on {baseline} (P(improvement) {words}{family_words(family)})"
    if side < 0:
        return f"{model} does worse than {baseline} (P(improvement) {words}{family_words(family)})"
    return f"P(improvement) does not separate {model} from {baseline} ({words})"


def conclusion(model: str, baseline: str, iqm_x: tuple[float, float, float], iqm_y: tuple[float, float, float],
               poi: tuple[float, float, float], detectable: float, where: str = "on the held-out envs",
               per_run: str = "mean held-out return", p_value: float | None = None,
               difference: tuple[float, float, float] | None = None, family: tuple[float, int] | None = None) -> str:
    """The one sentence the intervals support about ``model`` against ``baseline``, derived mechanically:
    an improvement (or a deficit) is claimed only when the IQM intervals do not overlap and the
    P(improvement) interval excludes 0.5 (and, when ``p_value`` is given, its permutation test rejects
    0.5 at ``ALPHA``); one of the two alone is reported as such; otherwise no difference is claimed,
    and the sentence gives the interval of the difference in mean (when ``difference`` is given) and
    the smallest difference these seeds could detect. Higher scores are better. Numbers
    are printed with the decimals that tell apart the interval ends a verdict compares.

    :param iqm_x: ``(point, low, high)`` IQM of ``model``; ``iqm_y`` the same for ``baseline``.
    :param poi: ``(point, low, high)`` of P(model > baseline).
    :param detectable: :func:`smallest_detectable_difference` of the per-run score (nan: fewer than two
        runs on a side, where the intervals have no width and no claim is made).
    :param where: where the scores were measured, as the sentence names it after an improvement or a
        deficit ("" to name nothing: the adaptation report names its measure before the sentence).
    :param per_run: the per-run score ``detectable`` is a difference of.
    :param p_value: :func:`poi_permutation_p` of the same scores, or None to judge by the interval alone.
    :param difference: :func:`mean_difference_interval` of the per-run score, model minus baseline.
    :param family: ``(Holm-adjusted p, comparisons in the family)`` of ``p_value``: a claim that rests on the
        permutation test says whether it survives the correction (the claim rule itself is per comparison).
    """
    digits = _digits_to_tell((iqm_x[1], iqm_y[2]), (iqm_x[2], iqm_y[1]), (poi[1], 0.5), (poi[2], 0.5))
    iqms = f"IQM {_ci(iqm_x, digits)} vs {_ci(iqm_y, digits)}"
    if not math.isfinite(detectable):
        return (f"too few runs to compare {model} with {baseline} (a model with one run has intervals of no "
                f"width; {iqms}): no claim is made")
    poi_side, poi_words = _poi_words(poi, p_value, digits)
    p = f"P({model} > {baseline}) {poi_words}"
    claimed_p = p + family_words(family)  # where P(improvement) separates the two, its corrected p as well
    # Not "a difference below ~X cannot be ruled out": that reads as if larger ones were ruled out, which
    # only the interval of the difference can say.
    sdd = f"a t-test on these runs detects a difference in {per_run} of ~{_fmt_nonzero(detectable)} with 80% power"
    if difference is not None and math.isfinite(difference[1]):
        gloss = ("it excludes 0, as a t-test alone would call a difference, but the rule above needs the IQM "
                 "intervals and P(improvement) as well" if difference[1] > 0 or difference[2] < 0
                 else "it holds 0, and these runs are compatible with any difference in it")
        sdd = (f"the difference in {per_run} is {_signed_ci_around_zero(difference)} (95% Welch t interval; {gloss}), "
               f"and {sdd}")
    where = f" {where}" if where else ""
    iqm_above, iqm_below = iqm_x[1] > iqm_y[2], iqm_x[2] < iqm_y[1]
    if iqm_above and poi_side > 0:
        return (f"{model} improves on {baseline}{where}: its IQM interval lies above {baseline}'s "
                f"({iqms}) and {claimed_p}")
    if iqm_below and poi_side < 0:
        return (f"{model} does worse than {baseline}{where}: its IQM interval lies below "
                f"{baseline}'s ({iqms}) and {claimed_p}")
    better, worse = iqm_above or poi_side > 0, iqm_below or poi_side < 0
    if better and worse:
        return f"the intervals disagree about {model} against {baseline} ({iqms}; {p}); no difference is claimed; {sdd}"
    if better or worse:
        side = "above" if better else "below"
        if iqm_above or iqm_below:
            held, missing = f"{model}'s IQM interval lies {side} {baseline}'s ({iqms})", p
        else:
            held, missing = p + family_words(family, "that separation"), f"the IQM intervals overlap ({iqms})"
        return f"only one measure separates {model} from {baseline}: {held}; the other does not: {missing}; {sdd}"
    return f"no difference between {model} and {baseline} the measures can resolve ({iqms}; {p}); {sdd}"


def conclude(model: str, baseline: str, x: np.ndarray, y: np.ndarray, reps: int = REPS, seed: int = 0) -> str:
    """:func:`conclusion` computed from score arrays ``(runs, envs)`` of ``model`` (``x``) and ``baseline`` (``y``):
    their IQM intervals, P(x > y) with its interval and permutation test, and the difference of the
    per-run mean scores (its interval and the smallest one these runs detect)."""
    x, y = _check(x), _check(y)
    estimates = interval_estimates({"x": x, "y": y}, reps=reps, seed=seed)
    poi = poi_interval(x, y, reps=reps, seed=seed)
    detectable = detectable_difference(x.mean(axis=1), y.mean(axis=1))
    return conclusion(model, baseline, estimates["x"]["iqm"], estimates["y"]["iqm"], poi, detectable,
                      p_value=poi_permutation_p(x, y, seed=seed),
                      difference=mean_difference_interval(x.mean(axis=1), y.mean(axis=1)))


def build_report(results: StudyResults, reps: int = REPS, plots: bool = True) -> str:
    """The report's markdown (and, with ``plots``, its PNGs in ``<study dir>/plots/``)."""
    study, envs = results.study, results.envs
    held = [e for e, h in zip(envs, results.held_out, strict=True) if h]
    final = results.scores()
    final = {m: s for m, s in final.items() if len(s)}
    if not final:
        raise StudyError(f"{results.directory}: no run has finished its final evaluation yet; nothing to report")
    heldout_scores = {m: s[:, results.held_out] for m, s in final.items()}
    lines = [f"# Study: {study.name}", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines += [f"Generated by `python study.py report {study.name}` on {when} from the finished runs; "
              "nothing here is written by hand.", ""]

    # Protocol.
    lines += ["## Protocol", ""]
    spec = study.eval
    intermediate = ", ".join(f"{p:,}" for p in study.points if p != study.total_frames) or "no intermediate point"
    where = f"suite `{spec.suite}`" if spec.suite else "env ids " + ", ".join(f"`{e}`" for e in spec.envs)
    lines += [f"- Budget: {study.total_frames:,} training frames per run; seeds {_seed_text(study.seeds)} "
              f"({len(study.seeds)} per model).",
              f"- Evaluation ({where}) with `evaluate.py --seed {spec.seed}`"
              f"{' --deterministic' if spec.deterministic else ' (sampled actions)'}: {spec.episodes} episodes per env "
              f"at {intermediate} frames, "
              f"{spec.final_episodes} at the end. Held out: {', '.join(held)}.",
              f"- Every run meets the same evaluation levels: evaluation episode i is seeded from child i of "
              f"`SeedSequence({spec.seed})` for every model and seed, whereas run s trains on the level streams of "
              f"`SeedSequence(s).spawn(n_envs)` (s in {_seed_text(study.seeds)}), so no evaluation seed is a training "
              "seed. The held-out envs are never trained on; on the training env itself a small grid has few "
              "distinct layouts, so some evaluation levels can look like training levels.",
              "- Score of a run on an env: its mean return over the evaluation episodes; per env, IQM and mean "
              "intervals, per evaluation point mean intervals, and performance profiles, from "
              f"{min(reps, SMALL_REPS):,} resamples; "
              "sample SD with ddof=1.",
              statistics_protocol(reps, "runs x envs", "seed s of every model meets the same evaluation levels"),
              ""]
    rows = []
    for label in results.models:
        model = study.model(label.split("@")[0])
        records = results.runs.get(label, [])
        rows.append([label, f"`{_short_path(model.config)}`", " ".join(f"`{o}`" for o in model.overrides) or "-",
                     str(sum(r.finished for r in records)),
                     ", ".join(sorted({r.provenance for r in records})) or "-"])
    lines += _table(["model", "config", "overrides", "finished runs", "provenance (config hash, code version)"], rows)
    if results.missing:
        lines += [f"Unfinished or not started (an unfinished run counts only at the evaluation points it has "
                  f"reached): {'; '.join(results.missing)}.", ""]
    lines += _left_out_lines(results, final)
    counts = {len(s) for s in final.values()}
    if len(counts) > 1:
        lines += ["**Models have different numbers of finished runs**: compare with care.", ""]

    # Aggregate over held-out envs.
    estimates = interval_estimates(heldout_scores, reps=reps)
    lines += ["## Held-out envs, aggregated (end of budget)", ""]
    lines += _table(["model", "runs", "IQM [95% CI]", "mean [95% CI]"],
                    [[m, str(len(heldout_scores[m])), _ci(estimates[m]["iqm"]), _ci(estimates[m]["mean"])]
                     for m in heldout_scores])

    # Per env.
    lines += ["## Per env (end of budget)", "", f"IQM [95% CI] / mean [95% CI] over runs ({min(reps, SMALL_REPS):,} "
              "resamples); * marks held-out envs.", ""]
    per_env = {}
    for j, env in enumerate(envs):
        per_env[env] = interval_estimates({m: s[:, [j]] for m, s in final.items()}, reps=min(reps, SMALL_REPS))
    rows = [[m, *(f"{_ci(per_env[e][m]['iqm'])} / {_ci(per_env[e][m]['mean'])}" for e in envs)] for m in final]
    lines += _table(["model", *(e + (" *" if h else "") for e, h in zip(envs, results.held_out, strict=True))], rows)

    # Probability of improvement and detectable differences.
    conclusions = []
    pois: dict[tuple[str, str], tuple[float, float, float]] = {}
    p_values: dict[tuple[str, str], float] = {}
    family: dict[tuple[str, str], tuple[float, int]] = {}
    if results.baselines:
        lines += ["## Probability of improvement over the LSTM baselines (held-out envs)", ""]
        rows = []
        for baseline in results.baselines:
            if baseline not in heldout_scores:
                continue
            for m in heldout_scores:
                if m == baseline:
                    continue
                x, y = heldout_scores[m], heldout_scores[baseline]
                pois[m, baseline] = poi_interval(x, y, reps=reps)
                p_values[m, baseline] = poi_permutation_p(x, y)
                rows.append([m, baseline, _poi_ci(pois[m, baseline]), p_text(p_values[m, baseline]),
                             *(per_env_poi(x, y, reps) if x.shape[1] > 1 else [])])
        # The family the report's claims are drawn from: every model that is not a baseline against every baseline,
        # each with two runs at least (with one, no claim is made).
        family = holm_family({pair: p for pair, p in p_values.items() if pair[0] not in results.baselines
                              and min(len(heldout_scores[pair[0]]), len(heldout_scores[pair[1]])) >= 2})
        for row in rows:
            adjusted = family.get((row[0], row[1]))
            row.insert(4, "-" if adjusted is None else p_text(adjusted[0]))
        lines += _table(["model X", "baseline Y", "P(X > Y) [95% CI]", "permutation test p (P = 0.5)",
                         f"Holm-adjusted p ({len(family)} comparison{'' if len(family) == 1 else 's'})",
                         *(f"{env} alone: P [95% CI], p" for env in held if len(held) > 1)], rows)
    per_run = {m: s.mean(axis=1) for m, s in heldout_scores.items()}
    for (m, baseline), poi in pois.items():
        if m not in results.baselines:
            detectable = detectable_difference(per_run[m], per_run[baseline])
            conclusions.append(conclusion(m, baseline, estimates[m]["iqm"], estimates[baseline]["iqm"], poi,
                                          detectable, p_value=p_values[m, baseline],
                                          difference=mean_difference_interval(per_run[m], per_run[baseline]),
                                          family=family.get((m, baseline))))
    lines += ["## Smallest detectable difference (held-out mean return per run)", "",
              detectable_protocol("mean held-out return per run"), ""]
    rows = []
    for baseline in results.baselines or list(per_run)[:1]:
        if baseline not in per_run:
            continue
        for m in per_run:
            if m == baseline:
                continue
            x, y = per_run[m], per_run[baseline]
            rows.append([m, baseline, _signed_ci(mean_difference_interval(x, y), 3),
                         _fmt(detectable_difference(x, y), 3)])
    lines += _table(["model X", "baseline Y", "mean(X) - mean(Y) [95% Welch t CI]", "smallest detectable difference"],
                    rows)

    # Held-out return against training frames.
    lines += ["## Held-out return during training", "", "Mean held-out return over runs [95% CI] at each point "
              "(checkpoint frames are the first whole rollout at or after the point).", ""]
    # The held-out average, and the same per env (the training env too; drawn only, in
    # plots/return_vs_frames_per_env.png): an average can hide one env rising while another falls.
    curve: dict[str, list[tuple[float, float, float]]] = {m: [] for m in final}
    env_curves: dict[str, dict[str, list[tuple[float, float, float]]]] = {env: {m: [] for m in final} for env in envs}
    # (where each point's estimates go, the score columns they are over)
    targets = [(curve, results.held_out), *((env_curves[env], [j]) for j, env in enumerate(envs))]
    for point in study.points:
        at_point = {m: s for m, s in results.scores(point).items() if len(s)}
        for target, column in targets:
            estimates_at = interval_estimates({m: s[:, column] for m, s in at_point.items()},
                                              reps=min(reps, SMALL_REPS)) if at_point else {}
            for m in final:
                target[m].append(estimates_at[m]["mean"] if m in estimates_at else (np.nan,) * 3)
    lines += _table(["model", *(f"{p:,}" for p in study.points)],
                    [[m, *(_ci(t) for t in curve[m])] for m in final])
    evaluated = []
    for point in study.points:
        frames = sorted({r.frames[point] for rs in results.runs.values() for r in rs if point in r.frames})
        evaluated.append(f"{point:,}: {' or '.join(f'{f:,}' for f in frames) or '-'}")
    lines += [f"Frames of the checkpoints evaluated at each point: {'; '.join(evaluated)}.", ""]

    # Per-seed tables.
    lines += ["## Per seed (end of budget)", "", "Mean return per run; the last rows give the mean and the sample SD "
              f"(ddof=1) over runs. Every run's scores at every evaluation point, unrounded, are in [{SCORES_FILE}]"
              f"({SCORES_FILE}) (`agents.report.read_scores_csv` reads them back into the arrays these statistics "
              "are computed from).", ""]
    for j, env in enumerate(envs):
        seeds = sorted({s for m in final for s in results.seeds(m)})
        rows = []
        for seed in seeds:
            row = [str(seed)]
            for m in final:
                index = results.seeds(m).index(seed) if seed in results.seeds(m) else None
                row.append(_fmt(final[m][index, j]) if index is not None else "-")
            rows.append(row)
        rows.append(["mean", *(_fmt(float(np.mean(final[m][:, j]))) for m in final)])
        rows.append(["SD", *(_fmt(sample_sd(final[m][:, j])) for m in final)])
        lines += [f"**{env}**{' (held out)' if results.held_out[j] else ''}", ""]
        lines += _table(["seed", *final], rows)

    lines += ["## What the intervals support", "", "Each sentence follows mechanically from the held-out intervals "
              "above: an improvement is claimed only when the IQM intervals do not overlap, the P(improvement) "
              f"interval excludes 0.5 and its permutation test gives p < {ALPHA}.", ""]
    if conclusions:
        lines += [f"- {c}." for c in conclusions]
    elif results.baselines and not any(b in heldout_scores for b in results.baselines):
        lines += [f"- No run of the LSTM baseline {' or '.join(results.baselines)} has a final score on every env: "
                  "no comparison made."]
    else:
        lines += ["- No LSTM baseline in this study: no comparison made." if not results.baselines
                  else "- No model besides the LSTM baselines has a final score on every env: no comparison made."]
    lines += [""]
    lines += provenance_lines(study, results.directory)
    if plots:
        figures = write_plots(results, heldout_scores, estimates, curve, pois, p_values, reps=min(reps, SMALL_REPS),
                              env_curves=env_curves, adjusted={pair: p for pair, (p, _) in family.items()})
        lines += ["## Plots", "", *(f"![{name}](plots/{name}.png)" for name in figures), ""]
    return "\n".join(lines)


def _left_out_lines(results: StudyResults, final: dict[str, np.ndarray]) -> list[str]:
    """A note naming the finished runs the statistics leave out, and why: a run counts only with a final score
    on every env (an evaluation that failed or was made with other envs leaves a gap), and without this
    note a model's statistics would quietly rest on fewer runs than the model table says it finished."""
    point, left_out = results.study.total_frames, []
    for label in results.models:
        kept = set(results.seeds(label)) if label in final else set()
        for record in results.runs.get(label, []):
            if not record.finished or record.seed in kept:
                continue
            returns = record.returns.get(point)
            gaps = ("no final evaluation" if returns is None else "no final score on " + ", ".join(
                env for env, value in zip(results.envs, returns, strict=True) if not np.isfinite(value)))
            left_out.append(f"{label} seed {record.seed} ({gaps})")
    if not left_out:
        return []
    return [f"**Left out of every statistic below** (a run counts only with a final score on every env): "
            f"{'; '.join(left_out)}.", ""]


def _seed_text(seeds: Sequence[int]) -> str:
    s = sorted(seeds)
    return f"{s[0]}-{s[-1]}" if s == list(range(s[0], s[-1] + 1)) and len(s) > 2 else ", ".join(map(str, s))


def _short_path(path: Path) -> str:
    from agents.study import REPO

    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def _frames_formatter() -> Any:
    """Tick labels of a frames axis: 50k, 1.5M (full numbers collide on a narrow panel)."""
    from matplotlib.ticker import FuncFormatter

    def label(x: float, _position: int) -> str:
        return f"{x / 1e6:g}M" if abs(x) >= 1e6 else f"{x / 1e3:g}k" if x else "0"

    return FuncFormatter(label)


def _draw_curves(ax: Any, points: np.ndarray, by_model: dict[str, list[tuple[float, float, float]]],
                 models: Sequence[str], markersize: float | None = None, alpha: float = 0.2) -> None:
    """Each model's (mean, low, high) at the study's points: a line and its interval band on ``ax``."""
    for i, m in enumerate(models):
        values = np.array(by_model[m], dtype=np.float64)
        ax.plot(points, values[:, 0], marker="o", markersize=markersize, label=m, color=f"C{i}")
        ax.fill_between(points, values[:, 1], values[:, 2], color=f"C{i}", alpha=alpha)
    ax.set_xlabel("training frames")
    ax.xaxis.set_major_formatter(_frames_formatter())


def write_plots(results: StudyResults, heldout_scores: dict[str, np.ndarray],
                estimates: dict[str, dict[str, tuple[float, float, float]]],
                curve: dict[str, list[tuple[float, float, float]]],
                pois: dict[tuple[str, str], tuple[float, float, float]],
                p_values: dict[tuple[str, str], float] | None = None, reps: int = SMALL_REPS,
                env_curves: dict[str, dict[str, list[tuple[float, float, float]]]] | None = None,
                adjusted: dict[tuple[str, str], float] | None = None) -> list[str]:
    """Write the report's PNGs into ``<study dir>/plots/`` and return their names (``adjusted``: the
    comparisons' Holm-adjusted p-values, written beside the raw ones).

    ``curve`` is each model's mean held-out return [95% CI] at the study's points; ``env_curves``, when
    given, the same per env (env -> model -> points), drawn one panel per env.
    """
    from matplotlib.figure import Figure

    from agents.plots import plot_probability_of_improvement, save_figure_atomic

    folder = results.directory / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    models = list(heldout_scores)
    written = []

    def save(name: str, figure: Figure) -> None:
        save_figure_atomic(figure, folder / f"{name}.png")
        written.append(name)

    # Interval estimates.
    figure = Figure(figsize=(9, 0.6 * len(models) + 1.6))
    for k, stat in enumerate(("iqm", "mean")):
        ax = figure.add_subplot(1, 2, k + 1)
        for i, m in enumerate(models):
            point, low, high = estimates[m][stat]
            ax.errorbar(point, i, xerr=[[point - low], [high - point]], fmt="o", capsize=5, color=f"C{i}")
        ax.set_yticks(range(len(models)), models if k == 0 else [""] * len(models))
        ax.set_ylim(-0.6, len(models) - 0.4)
        ax.margins(x=0.1)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"{stat.upper() if stat == 'iqm' else 'Mean'} held-out return (95% CI)")
        ax.set_xlabel("return")
    figure.tight_layout()
    save("interval_estimates", figure)

    # Probability of improvement.
    if pois:
        save("probability_of_improvement",
             plot_probability_of_improvement(pois, models, "probability of improvement (95% CI), held-out envs",
                                             p_values, ALPHA, adjusted))

    # Performance profiles.
    everything = np.concatenate([s.ravel() for s in heldout_scores.values()])
    taus = np.linspace(min(0.0, float(everything.min())), max(1.0, float(everything.max())), 51)
    profiles = performance_profile(heldout_scores, taus, reps=reps)
    figure = Figure(figsize=(6, 4))
    ax = figure.add_subplot(1, 1, 1)
    for i, m in enumerate(models):
        profile, low, high = profiles[m]
        ax.plot(taus, profile, label=m, color=f"C{i}")
        ax.fill_between(taus, low, high, color=f"C{i}", alpha=0.2)
    ax.set_xlabel("held-out return threshold tau")
    ax.set_ylabel("fraction of runs x envs with score > tau")
    ax.legend()
    figure.tight_layout()
    save("performance_profile", figure)

    # Held-out return against training frames.
    figure = Figure(figsize=(6, 4))
    ax = figure.add_subplot(1, 1, 1)
    points = np.array(results.study.points, dtype=np.float64)
    _draw_curves(ax, points, curve, models)
    ax.set_ylabel("mean held-out return (95% CI)")
    ax.legend()
    figure.tight_layout()
    save("heldout_vs_frames", figure)

    # Return against training frames, one panel per env.
    if env_curves:
        held = dict(zip(results.envs, results.held_out, strict=True))
        rows = -(-len(env_curves) // 4)  # at most 4 panels a row, the rows filled evenly (5 envs: 3 + 2)
        columns = -(-len(env_curves) // rows)
        figure = Figure(figsize=(3.6 * columns, 3.2 * rows + 0.5))
        for k, (env, by_model) in enumerate(env_curves.items()):
            ax = figure.add_subplot(rows, columns, k + 1)
            _draw_curves(ax, points, by_model, models, markersize=3, alpha=0.15)
            ax.set_title(f"{env}{' (held out)' if held.get(env) else ' (training)'}", fontsize=10)
            drawn = np.array([v for series in by_model.values() for t in series for v in t], dtype=np.float64)
            if drawn[np.isfinite(drawn)].size and 0 <= np.nanmin(drawn) and np.nanmax(drawn) <= 1:
                ax.set_ylim(-0.02, 1.02)  # MiniGrid returns: one scale for every panel; raw scores keep their own
            ax.grid(alpha=0.3)
            if k % columns == 0:
                ax.set_ylabel("mean return (95% CI)")
        figure.axes[0].legend(fontsize=8)
        figure.tight_layout()
        save("return_vs_frames_per_env", figure)
    return written


def write_report(study: str | Path, root: str | Path = DEFAULT_ROOT, split_versions: bool = False,
                 reps: int = REPS) -> Path:
    """Rebuild ``<study dir>/report.md``, its plots and its scores CSVs (``scores.csv``; an adaptation study's
    ``finetune_scores.csv`` too) from the finished runs (trains nothing)."""
    from agents.study import atomic_write

    directory = study_dir(study, root)
    spec = load_study_dir(directory)
    if spec.adaptation is not None:  # pre-training, fine-tuning, adaptation measures
        # Read once: the report and its scores files come from the same runs.
        pre, finetunes = load_results(directory, root, split_versions=split_versions), load_finetunes(spec, directory)
        text = build_adaptation_report(directory, root, split_versions=split_versions, reps=reps,
                                       loaded=(pre, finetunes))
        atomic_write(directory / SCORES_FILE, scores_csv(pre).encode())
        scores = finetune_scores_csv(finetunes[0], spec.adaptation.tasks, spec.adaptation.total_frames)
        atomic_write(directory / FINETUNE_SCORES_FILE, scores.encode())
        atomic_write(directory / "report.md", text.encode())
        return directory / "report.md"
    results = load_results(study, root, split_versions=split_versions)
    text = build_report(results, reps=reps)
    atomic_write(results.directory / SCORES_FILE, scores_csv(results).encode())
    path = results.directory / "report.md"
    atomic_write(path, text.encode())
    return path


# -- provenance and publishing ---------------------------------------------------------------------


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes >= 60:
        return f"{minutes // 60} h {minutes % 60:02d} min"
    return f"{max(minutes, 1) if seconds else 0} min"


def study_versions(study: Study, directory: Path) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """The code versions that trained and evaluated a study's runs (fine-tuning runs included).

    :return: ``({version tag: [run keys]}, git commits recorded, runs without a recorded version)``.
    """
    from agents.study import all_jobs

    versions: dict[str, list[str]] = {}
    commits: list[str] = []
    unknown: list[str] = []
    for job in all_jobs(study, directory):
        provenance = read_provenance(Path(job.run_dir))
        tags = code_versions(provenance)
        if not tags:
            unknown.append(job.key)
        for tag in tags:
            versions.setdefault(tag, []).append(job.key)
        for session in (provenance or {}).get("sessions", []):
            commit = session.get("commit")
            if commit:
                text = short_commit(commit) + (" (with uncommitted changes)" if session.get("dirty") else "")
                if text not in commits:
                    commits.append(text)
    return versions, commits, unknown


def _machine_text(machine: dict[str, Any]) -> str:
    """One session's machine as the provenance lists it: system, CPU (with its vector instructions where
    recorded), CPU count, Python and torch."""
    cpu, vector = machine.get("cpu"), machine.get("vector")
    if vector not in (None, "unknown"):  # sessions recorded before b849d2b have none
        cpu = f"{cpu} ({vector})"
    return ", ".join(str(part) for part in (machine.get("system"), cpu, f"{machine.get('cpus')} CPUs",
                                            f"Python {machine.get('python')}", f"torch {machine.get('torch')}"))


def provenance_lines(study: Study, directory: Path) -> list[str]:
    """The report's "Provenance" section: the commands that ran the study, when, on what machine, for how
    long (from ``sessions.jsonl``, where each ``study.py run`` records itself) and the code version of its runs."""
    from agents.study import read_study_sessions, unplanned_runs

    sessions = read_study_sessions(directory)
    versions, commits, unknown = study_versions(study, directory)
    lines = ["## Provenance", ""]
    if sessions:
        commands = list(dict.fromkeys(str(s.get("command")) for s in sessions))
        machines = list(dict.fromkeys(_machine_text(s.get("machine") or {}) for s in sessions))
        seconds = sum(float(s.get("seconds") or 0.0) for s in sessions)
        # A session that never recorded its end was killed outright (or runs still): it counts up to its
        # last heartbeat (study.py renews the record each minute).
        unended = sum(s.get("ended") is None for s in sessions)
        # Times are ISO-8601 UTC strings of one format, so they order as text; the file's order need not
        # be time order (a record is written when its session starts, older ones when theirs ended).
        first = min((str(s["started"]) for s in sessions if s.get("started")), default="?")
        last = max((str(s.get("ended") or s.get("last_seen")) for s in sessions
                    if s.get("ended") or s.get("last_seen")), default="?")
        lines += [f"- Command: {'; '.join(f'`{c}`' for c in commands)}.",
                  f"- Run from {first} to {last} (UTC) in "
                  f"{len(sessions)} session(s) of `study.py run`"
                  + (f"; {unended} of them did not record an end (killed, or still running) and count up to "
                     "their last recorded heartbeat (renewed each minute)" if unended else "") + ".",
                  f"- Wall time: {_duration(seconds)} ({seconds:,.0f} s summed over the sessions).",
                  f"- Machine (the one `study.py run` ran on; with Ray, the runs may have run elsewhere): "
                  f"{'; '.join(machines)}."]
    else:
        lines += [f"- Command: `python study.py run {study.source or study.name}`; when, where and how long it ran "
                  "were not recorded (the runs predate study.py's session log, sessions.jsonl)."]
    listing = "; ".join(f"`{tag}` ({len(keys)} runs)" for tag, keys in versions.items()) or "not recorded"
    lines += [f"- Code version (hash of agents/, policies/, envs/, train.py, evaluate.py): {listing}"
              + (f"; git commit {', '.join(c for c in commits if c.split(' ')[0] not in versions)}"
                 if any(c.split(" ")[0] not in versions for c in commits) else "")
              + (f"; no version recorded for {', '.join(unknown)}" if unknown else "") + "."]
    unplanned = unplanned_runs(study, directory)
    if unplanned:
        listing = ", ".join(f"`{path.relative_to(directory)}`" for path in unplanned)
        lines += [f"- Left out: {len(unplanned)} run folder(s) that the study file no longer plans (seeds, models or "
                  f"fine-tuning runs taken out after they ran): {listing}. No number here uses them"
                  + ("; the sessions that trained them count in the wall time above" if sessions else "") + "."]
    return [*lines, ""]


def check_publishable(study: str | Path, root: str | Path = DEFAULT_ROOT) -> tuple[Study, Path, str]:
    """Refuse a study that cannot be published: unfinished runs, or runs made by more than one code version.

    :return: ``(study, its directory, its one code version tag)``.
    :raises StudyError: one line saying what is missing or mixed.
    """
    from agents.study import all_jobs, continue_command

    directory = study_dir(study, root)
    spec = load_study_dir(directory)
    jobs = all_jobs(spec, directory)
    unfinished = [job.key for job in jobs if not job_state(job).done]
    if unfinished:
        shown = ", ".join(unfinished[:5]) + (f" and {len(unfinished) - 5} more" if len(unfinished) > 5 else "")
        raise StudyError(f"study {spec.name} is not finished ({len(unfinished)} of {len(jobs)} runs: {shown}); "
                         f"finish it with `{continue_command(spec, spec.executor.name, None, None, directory)}` "
                         "before publishing")
    versions, _, unknown = study_versions(spec, directory)
    if unknown:
        raise StudyError(f"study {spec.name}: runs without a recorded code version ({', '.join(unknown[:5])}); "
                         "rerun them before publishing")
    if len(versions) > 1:
        listing = "; ".join(f"{tag}: {len(keys)} runs" for tag, keys in versions.items())
        raise StudyError(f"study {spec.name} mixes code versions ({listing}); rerun its runs from one version "
                         "(a new study name) before publishing")
    return spec, directory, next(iter(versions))


GENERATED_MARK = "<!-- generated by study.py publish"


def _page_hash(body: str) -> str:
    import hashlib

    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _previous_page(out: Path) -> tuple[bool, list[str]]:
    """Whether ``out`` is absent or an unedited generated page, and the studies it published.

    :raises StudyError: ``out`` is not text (a checkpoint, an image): no page, and not one to replace.
    """
    import json

    try:
        text = out.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return True, []
    except UnicodeDecodeError:
        raise StudyError(f"--out {out} is not a results page (not UTF-8 text); refusing to replace it, even with "
                         "--force: give the page's path (e.g. docs/results.md)") from None
    first, _, body = text.partition("\n")
    if not first.startswith(GENERATED_MARK):
        return False, []
    try:
        meta = json.loads(first[len(GENERATED_MARK):].removesuffix("-->").strip().removeprefix(";").strip())
    except ValueError:
        return False, []
    studies = [str(s) for s in meta.get("studies", [])] if isinstance(meta, dict) else []
    return isinstance(meta, dict) and meta.get("sha256") == _page_hash(body), studies


def published_studies(page: str | Path) -> list[str]:
    """The studies a results page written by :func:`publish` holds, in order (none for another page)."""
    return _previous_page(Path(page))[1]


def _section(text: str, heading: str) -> list[str]:
    """The bullet lines of one ``## heading`` section of a report."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            inside = line[3:].strip() == heading
        elif inside and line.startswith("- "):
            lines.append(line)
    return lines


def _published_parts(text: str, name: str) -> tuple[str, list[str], list[str]]:
    """One study's banner entry, summary lines and section (``## Study: name`` to the next study) on a page."""
    lines = text.splitlines()
    banner = next((line for line in lines if line.startswith("> Published: ")), "")
    # The entry's parentheses can hold one level more: "git commit abc (with uncommitted changes)".
    entry = re.search(r"`" + re.escape(name) + r"` \(code version `[^`]+`(?:[^()]|\([^()]*\))*\)", banner)
    summary = [line for line in lines if line.startswith(f"- **{name}**: ")]
    titles = ("## Study: ", "## Adaptation study: ")  # the two kinds of report's titles, one level down
    start = next((i for i, line in enumerate(lines) if line in {title + name for title in titles}), len(lines))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(titles)), len(lines))
    section = lines[start:end]
    while section and not section[-1].strip():
        section.pop()
    if entry is None or not section:
        raise StudyError(f"cannot find study {name}'s section on the page to keep it; publish it again from its runs")
    return entry.group(0), summary, section


# The PNG names the report code writes into a study's plots/ (write_plots here, agents.adaptation's
# _write_plots). publish copies only these (a PNG someone else saved in a study's plots/ is not the report's)
# and the DATA_NAMES files, so in a published study's folder files of these names are publish's own copies,
# which it replaces; anything else there is someone's file, which it never touches.
PLOT_NAMES = frozenset({"interval_estimates", "probability_of_improvement", "performance_profile",
                        "heldout_vs_frames", "return_vs_frames_per_env", "finetune_curves",
                        "area_interval_estimates"})
# The per-run scores files a report links (its own folder's), which publish copies beside the plots.
DATA_NAMES = frozenset({SCORES_FILE, FINETUNE_SCORES_FILE})


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot be a page: a folder, a path under a file, or one without an extension
    (its plots folder, ``<its folder>/<its stem>/``, would be the page itself).

    :raises StudyError: one line naming --out and the cause.
    """
    from agents.run_dir import nearest_existing

    existing = nearest_existing(out)
    if existing == out and out.is_dir():
        raise StudyError(f"--out {out} is a folder; give the page's file name (e.g. {out / 'results.md'})")
    if existing != out and not existing.is_dir():
        raise StudyError(f"--out {out}: {existing} is a file, not a folder")
    if not out.suffix:
        raise StudyError(f"--out {out} has no extension: its plots go to {out.parent / out.stem}/, the page's own "
                         f"name; give e.g. {out}.md")
    assets = out.parent / out.stem
    if nearest_existing(assets) == assets and not assets.is_dir():
        raise StudyError(f"--out {out}: {assets}, where the page's plots go, is a file, not a folder")


def _check_plots_folder(folder: Path) -> None:
    """Refuse a published study's plots folder that holds anything publish did not write there: anything but
    :func:`_is_own_file` files (another file, a folder, a link: what it points to is not publish's).

    :raises StudyError: one line naming the folder and the first such entry.
    """
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise StudyError(f"{folder} is {'a link' if folder.is_symlink() else 'a file'}, not the folder of plots "
                         "study.py publish writes there; move it away or give another --out")
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        if not _is_own_file(entry):
            raise StudyError(f"{folder} holds {entry.name}, which study.py publish did not write (it replaces only "
                             "the report's plot PNGs and scores CSVs there); move it away or give another --out")


def _is_own_file(entry: Path) -> bool:
    """Whether ``entry`` is a file publish copies: a plot (``<name>.png``, ``name`` in :data:`PLOT_NAMES`) or a
    scores file (:data:`DATA_NAMES`), and a plain file, not a link."""
    own = (entry.suffix == ".png" and entry.stem in PLOT_NAMES) or entry.name in DATA_NAMES
    return own and entry.is_file() and not entry.is_symlink()


def _remove_plots(folder: Path) -> None:
    """Delete the files publish copied into ``folder``, so plots a report no longer draws do not linger beside the
    new ones. Only those: anything saved there since :func:`_check_plots_folder` looked stays."""
    if folder.is_dir() and not folder.is_symlink():
        for entry in folder.iterdir():
            if _is_own_file(entry):
                entry.unlink()


def publish(studies: Sequence[str | Path], out: str | Path, root: str | Path = DEFAULT_ROOT, reps: int = REPS,
            force: bool = False, command: str | None = None, keep: bool = False, drop: bool = False) -> Path:
    """Write the results page ``out`` (e.g. ``docs/results.md``) from the reports of finished studies.

    Every study is checked first (:func:`check_publishable`: all runs finished, one code version);
    then its report is rebuilt from its runs (``write_report``), its PNGs and the scores files it links
    (``scores.csv``, an adaptation study's ``finetune_scores.csv``) are copied to
    ``<out dir>/<out stem>/<study>/`` and its report goes into the page under a banner naming the
    published studies and their code versions. With no study, the page says that none is published
    yet. The page is written atomically and marked as generated; a page that was edited by hand (or
    was not generated) is replaced only with ``force``. With ``keep``, the studies already on the page
    and not named here stay on it as they were published (text, summary lines and PNGs; they were
    checked when they were published), so studies run on different machines or days, whose run
    directories are not all on one machine, can be published one at a time. A study on the page that is
    neither named nor kept comes off it, and its plots folder with it, only with ``drop``: its runs may be
    on another machine, so a forgotten name must not delete what cannot be made again here.

    :raises StudyError: a study that cannot be published, a hand-edited page without ``force``, an ``out``
        that is no page (a folder, a path under a file, a binary file), a study's plots folder holding
        anything publish did not copy there (checked before anything is written), ``keep`` with a page
        that is not an unedited generated one, ``keep`` with ``drop``, or a study on the page that would
        come off it without ``drop``.
    """
    import json
    import shutil

    from agents.study import all_jobs, atomic_write

    out = Path(out)
    _check_out(out)
    checked = [check_publishable(s, root) for s in studies]
    unedited, previous = _previous_page(out)
    if not unedited and not force:
        raise StudyError(f"{out} was edited by hand or not written by study.py publish; pass --force to replace it "
                         "(keep a copy first if it is not in version control)")
    if keep and drop:
        raise StudyError("--keep keeps the studies on the page that are not named and --drop takes them off it; "
                         "give one of them")
    names = [spec.name for spec, _, _ in checked]
    if len(set(names)) < len(names):
        raise StudyError(f"a study is named twice: {', '.join(names)}")
    kept: dict[str, tuple[str, list[str], list[str]]] = {}
    if keep:
        if not unedited or not out.exists():
            raise StudyError(f"--keep keeps the studies of a page written by study.py publish; {out} "
                             + ("does not exist" if not out.exists() else "was edited by hand or not generated"))
        previous_text = out.read_text(encoding="utf-8")
        kept = {name: _published_parts(previous_text, name) for name in previous if name not in names}
    assets = out.parent / out.stem
    leaving = [name for name in previous if name not in names and name not in kept]
    if leaving and not drop:
        plural = len(leaving) > 1
        raise StudyError(f"{out} publishes {', '.join(leaving)}, not named here; name {'them' if plural else 'it'} "
                         f"to publish {'them' if plural else 'it'} again from the runs, add --keep to keep "
                         f"{'them' if plural else 'it'} as published, or --drop to take {'them' if plural else 'it'} "
                         f"off the page (deleting {assets / leaving[0]}/{' and the others' if plural else ''})")
    # Studies on the old page and not on the new one lose their plots. A name from a page's mark (which
    # --force accepts edited) that is not a plain folder name is no folder of publish's.
    dropped = [name for name in leaving if name not in ("", ".", "..") and Path(name).name == name]
    # Every plots folder is checked before anything is written (a report, a PNG, the page): one holding a
    # file publish did not write refuses the whole command, and nothing changes.
    for spec, _, _ in checked:
        _check_plots_folder(assets / spec.name)
    for name in dropped:
        _check_plots_folder(assets / name)
    parts: dict[str, tuple[str, list[str], list[str]]] = dict(kept)  # study -> banner entry, summary, section
    for spec, directory, version in checked:
        report_path = write_report(directory, directory.parent, reps=reps)
        text = report_path.read_text(encoding="utf-8")
        target = assets / spec.name
        _remove_plots(target)
        target.mkdir(parents=True, exist_ok=True)
        # The plots this report links (an older report's plot it no longer draws stays out of the page's folder).
        linked = set(re.findall(r"\]\(plots/([^)/]+)\.png\)", text))
        for png in sorted((directory / "plots").glob("*.png")):
            if png.stem in PLOT_NAMES and png.stem in linked:
                shutil.copyfile(png, target / png.name)
        data = [name for name in sorted(DATA_NAMES) if f"]({name})" in text]  # the scores the report links
        for name in data:
            shutil.copyfile(directory / name, target / name)
        link = f"{target.relative_to(out.parent).as_posix()}/"

        def relinked(line: str) -> str:
            for name in data:
                line = line.replace(f"]({name})", f"]({link}{name})")
            return line.replace("](plots/", f"]({link}")

        body = [("#" + line if line.startswith("#") else relinked(line)) for line in text.splitlines()]
        _, commits, _ = study_versions(spec, directory)
        commits = [c for c in commits if not version.startswith(c.split(" ")[0])]  # a version set by hand is its own
        runs = len(all_jobs(spec, directory))  # every run, an adaptation study's fine-tuning runs included
        entry = (f"`{spec.name}` (code version `{version}`"
                 + (f", git commit {', '.join(commits)}" if commits else "")
                 + f"; {runs} runs; {_statistics_tag()})")
        found = _section(text, "What the intervals support") or _section(text, "The questions")
        parts[spec.name] = (entry, [f"- **{spec.name}**: {line[2:]}" for line in found], body)
    # With --keep a study published again keeps its place on the page and new ones follow; otherwise the
    # page follows the command's order.
    order = ([name for name in previous if name in parts] + [name for name in names if name not in previous]
             if keep else names)
    banner = [parts[name][0] for name in order]
    summary = [line for name in order for line in parts[name][1]]
    sections = [line for name in order for line in [*parts[name][2], ""]]
    for name in dropped:
        _remove_plots(assets / name)
        with contextlib.suppress(OSError):  # gone already, or not empty (something saved there since the check)
            (assets / name).rmdir()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = command or " ".join(["python study.py publish", *names, "--out", str(out), *(["--keep"] if keep else [])])
    names = order
    lines = ["# Results", "",
             f"> Generated by `{command}` on {when} from the published studies' reports; do not edit by hand "
             "(rerun the command: edits are refused, then lost with --force).", ""]
    older = [name for name in order if not parts[name][0].endswith(f"; {_statistics_tag()})")]
    stale = (f" Published by earlier report code (other statistics, see the statistics version): "
             f"{', '.join(f'`{name}`' for name in older)}; publish again from the runs to update." if older else "")
    if checked or kept:
        lines += [f"> Published: {'; '.join(banner)}. Every run of a study finished, all made by the one code "
                  f"version named.{stale}", "", "## Summary", "", "What the intervals support, per study (details below).",
                  "", *(summary or ["- No comparison made."]), "", *sections]
    else:
        lines += ["No study is published yet. Run one (`python study.py run configs/studies/<study>.yaml`), then "
                  "publish it with `python study.py publish <study> --out docs/results.md`.", ""]
    page = "\n".join(lines).rstrip("\n") + "\n"
    mark = f"{GENERATED_MARK}; " + json.dumps({"studies": names, "sha256": _page_hash(page)}) + " -->"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, (mark + "\n" + page).encode())
    return out


__all__ = ["RunRecord", "StudyResults", "build_report", "check_publishable", "conclude", "conclusion",
           "detectable_difference", "fast_iqm",
           "interval_estimates", "iqm", "load_results", "load_scores", "mean", "performance_profile", "poi_interval",
           "probability_of_improvement", "provenance_lines", "publish", "published_studies",
           "csv_text", "read_csv_rows", "read_scores_csv", "sample_sd", "score_matrices", "scores_csv",
           "score_distribution",
           "smallest_detectable_difference", "study_versions", "verdict", "write_report"]
