"""Where a study's jobs run: a local pool of worker threads driving subprocesses, or Ray tasks.

Both executors run :func:`agents.study.execute_job` for each job (train.py, then evaluate.py, as
subprocesses) and show one live line: runs done / running / queued / failed and the frames per
second of the runs training now (read from their ``metrics.jsonl``).

- ``run_local``: ``workers`` jobs at a time on this machine (default: the CPU count), one torch
  thread each. Ctrl-C (or SIGTERM) asks every running train.py to checkpoint and stop (SIGINT to
  each), waits for them and returns; a second Ctrl-C makes them abort at once (their last
  checkpoint is intact).
- ``run_ray``: each job is a Ray task with ``num_cpus``/``num_gpus`` requests, on the cluster at
  ``address`` (``auto``: the one ``ray start`` set up here) or a new local instance. Ray is
  imported here only, so the package never needs it unless asked; Ctrl-C cancels the tasks, which
  stop their subprocesses the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from agents.study import Job, JobResult, StudyError, execute_job, job_state, request_stop, stop_level

RAY_MISSING = 'the ray executor needs Ray, which is not installed: pip install -e ".[cluster]"'


def default_workers() -> int:
    """As many workers as this process may use CPU cores."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _last_row(run_dir: Path, since: float = 0.0) -> dict[str, Any]:
    """The last metrics row of a run, if written after ``since`` (else, or if none, an empty dict)."""
    path = run_dir / "metrics.jsonl"
    try:
        if path.stat().st_mtime < since:
            return {}
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 4096))
            lines = handle.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return {}
    import json

    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            return row
    return {}


def _last_row_fps(run_dir: Path, since: float) -> float:
    """``time/fps`` of the last metrics row of a run written after ``since`` (0 if none)."""
    try:
        return float(_last_row(run_dir, since).get("time/fps") or 0.0)
    except (TypeError, ValueError):
        return 0.0


def frames_left(jobs: Sequence[Job]) -> int:
    """Training frames the jobs still have to run, from each run's last metrics row."""
    left = 0
    for job in jobs:
        try:
            trained = int(_last_row(Path(job.run_dir)).get("frames") or 0)
        except (TypeError, ValueError):
            trained = 0
        left += max(job.total_frames - trained, 0)
    return left


def _duration(seconds: float) -> str:
    """``1h05m`` / ``12m`` / ``40s``."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m" if seconds >= 60 else f"{seconds}s"


class Display:
    """One live status line (rewritten in place on a terminal, a line every 30 s otherwise)."""

    def __init__(self, name: str, total: int, done: int, stream: TextIO | None = None,
                 todo: Sequence[Job] = ()) -> None:
        """:param todo: the jobs this session runs; with them the line estimates the time left."""
        self.name, self.total, self.done_before = name, total, done
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.started = time.time()
        self._last_print = 0.0
        self._width = 0
        self.todo = list(todo)
        self.frames_at_start = frames_left(self.todo)
        self._left, self._left_read_at = self.frames_at_start, 0.0

    def line(self, done: int, running: Sequence[Job], queued: int, failed: int) -> str:
        """The status line for these counts."""
        fps = sum(_last_row_fps(Path(job.run_dir), time.time() - 30) for job in running)
        elapsed = int(time.time() - self.started)
        failures = f", {failed} failed" if failed else ""
        return (f"{self.name}: {done}/{self.total} runs done, {len(running)} running, {queued} queued{failures} | "
                f"{fps:,.0f} frames/s | {elapsed // 60}m{elapsed % 60:02d}s{self._time_left(elapsed)}")

    def _time_left(self, elapsed: float) -> str:
        """``, ~1h05m left``: the frames left at this session's average rate so far (evaluations and
        start-up included, as they take their share of the time); empty until a minute's progress."""
        if not self.todo or elapsed < 60:
            return ""
        # Read the runs' files at most every 15 s (a terminal's line is redrawn every second).
        if time.time() - self._left_read_at >= 15:
            self._left, self._left_read_at = frames_left(self.todo), time.time()
        left = self._left
        trained = self.frames_at_start - left
        if trained <= 0:
            return ""
        return f", ~{_duration(elapsed * left / trained)} left" if left else ""

    def update(self, done: int, running: Sequence[Job], queued: int, failed: int, force: bool = False) -> None:
        """Show the counts (rate-limited)."""
        now = time.time()
        if not force and now - self._last_print < (1.0 if self.tty else 30.0):
            return
        self._last_print = now
        text = self.line(done, running, queued, failed)
        if self.tty:
            self._write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self._write(text + "\n")

    def message(self, text: str) -> None:
        """Print a line without breaking the live line."""
        if self.tty and self._width:
            self._write("\r" + " " * self._width + "\r")
            self._width = 0
        self._write(text + "\n")

    def _write(self, text: str) -> None:
        # After a hangup the terminal answers every write with EIO: the display goes quiet rather than
        # end the pool loop (which must still stop the runs it started).
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:
            self.stream = open(os.devnull, "w")  # lives as long as the display
            self.tty = False

    def close(self) -> None:
        """End the live line."""
        if self.tty and self._width:
            self._write("\n")
            self._width = 0


def _report(display: Display, result: JobResult) -> None:
    if result.status == "done":
        display.message(f"  {result.key}: done")
    elif result.status == "failed":
        display.message(f"  {result.key}: FAILED: {result.message}")


@contextlib.contextmanager
def _stop_signals_handled(handler: Callable[[int, Any], None], with_sigint: bool) -> Iterator[None]:
    """Install ``handler`` for SIGTERM and SIGHUP (and SIGINT when asked) within the block; a SIGHUP
    that is ignored (``nohup``) stays ignored. The previous handlers come back afterwards."""
    caught = [signal.SIGTERM, *([signal.SIGINT] if with_sigint else [])]
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        caught.append(signal.SIGHUP)  # not under nohup: a study started that way keeps running on a hangup
    previous = {number: signal.signal(number, handler) for number in caught}
    try:
        yield
    finally:
        for number, action in previous.items():
            signal.signal(number, action)


@contextlib.contextmanager
def stop_signals_as_interrupt() -> Iterator[list[str]]:
    """Within the block SIGTERM and SIGHUP raise KeyboardInterrupt, so a scheduler's stop or a closed
    terminal (an ssh session that drops) is a clean stop: the runs, in their own sessions, would
    otherwise go on training unsupervised, holding their run locks against the next `run`. A SIGHUP
    that is ignored (``nohup``) stays ignored. The yielded list names the signals received."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, _frame: Any) -> None:
        received.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    with _stop_signals_handled(handler, with_sigint=False):
        yield received


@contextlib.contextmanager
def stop_signals_recorded() -> Iterator[list[str]]:
    """Within the block Ctrl-C (SIGINT), SIGTERM and SIGHUP only append their names to the yielded
    list, for a loop that checks it between steps: unlike an interrupt, a signal then cannot cut a step
    short, such as starting a process (between its fork and ``Popen``'s return an interrupt loses the
    child, which trains on unsupervised). Outside the main thread, where Python cannot install signal
    handlers, the list stays empty."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    with _stop_signals_handled(lambda signum, _frame: received.append(signal.Signals(signum).name),
                               with_sigint=True):
        yield received


def stop_exit_status(stopped: str) -> int:
    """Exit status of a driver stopped by the signal named ``stopped`` ("SIGINT", "SIGTERM", "SIGHUP", as
    ``stop_signals_as_interrupt`` and ``stop_signals_recorded`` record them): 128 + its number, as a shell
    reports it (130, 143, 129)."""
    return 128 + signal.Signals[stopped].value


@dataclasses.dataclass
class Outcome:
    """What an executor came to: one result per job it ran, and whether it was stopped (and by what)."""

    results: list[JobResult]
    stopped: str | None = None  # "SIGINT", "SIGTERM" or "SIGHUP"


def run_local(jobs: Sequence[Job], workers: int | None = None, display: Display | None = None) -> Outcome:
    """Run ``jobs`` on this machine, ``workers`` at a time (default: the CPU count).

    :return: the results of the jobs that ran, and ``stopped`` when Ctrl-C / SIGTERM stopped the pool
        (the running jobs were asked to checkpoint; queued ones never started).
    """
    workers = workers or default_workers()
    display = display or Display("study", len(jobs), 0)
    todo: queue.Queue[Job] = queue.Queue()
    for job in jobs:
        todo.put(job)
    level = [0]  # 0 run, 1 stop (checkpoint and exit), 2 abort (a second Ctrl-C)
    running: dict[str, Job] = {}
    results: list[JobResult] = []
    lock = threading.Lock()

    def worker() -> None:
        while level[0] == 0:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            with lock:
                running[job.key] = job
            try:
                result = execute_job(job, lambda stop_file=job.stop_file: max(level[0], stop_level(stop_file)))
            except Exception as exc:  # noqa: BLE001 - a bug must not hang the pool: this job's failure
                result = JobResult(job.key, "failed", f"{type(exc).__name__}: {exc}")
            with lock:
                running.pop(job.key, None)
                results.append(result)
            _report(display, result)

    threads = [threading.Thread(target=worker, daemon=True, name=f"study-worker-{i}") for i in range(workers)]
    stopped: str | None = None
    # Signals are only recorded and checked between waits, never raised as KeyboardInterrupt: on
    # Python 3.11 an interrupt landing in Thread.join marks the still-running worker as finished
    # (CPython's bpo-45274 clean-up releases the worker's own lock), the loop ended and the process
    # exited with its train.py runs training on unsupervised instead of checkpointing.
    with stop_signals_recorded() as received:
        for thread in threads:
            thread.start()
        seen = 0
        while any(thread.is_alive() for thread in threads):
            time.sleep(0.2)
            if len(received) > seen:
                seen = len(received)
                stopped = received[-1]
                level[0] = min(2, seen)
                display.message("stopping: asked the running runs to checkpoint and exit (Ctrl-C again to abort them)"
                                if level[0] == 1 else "aborting the running runs (their last checkpoints are intact)")
            with lock:
                current = list(running.values())
                done = sum(r.status == "done" for r in results)
                failed = sum(r.status == "failed" for r in results)
            display.update(display.done_before + done, current, todo.qsize(), failed)
        if len(received) > seen:  # arrived as the last worker finished: still a stopped session
            stopped = received[-1]
    display.close()
    return Outcome(results, stopped)


def _ray_execute(job: Job) -> JobResult:
    """A Ray task: run one job on whichever node Ray chose (paths must be on a shared file system)."""
    repo = job.repo if (Path(job.repo) / "train.py").is_file() else str(Path(__file__).resolve().parent.parent)
    local = dataclasses.replace(job, python=sys.executable, repo=repo)
    try:  # a cancel during a subprocess reaches run_command as a KeyboardInterrupt: it stops the child
        return execute_job(local)
    except KeyboardInterrupt:  # cancelled between subprocesses
        return JobResult(job.key, "stopped", "cancelled")


def import_ray() -> Any:
    """Import Ray, or raise StudyError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise StudyError(RAY_MISSING) from None
    return ray


def check_ray_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse a ``HOST:PORT`` (or ``ray://HOST:PORT``) address nothing answers at within ``timeout`` seconds.

    ``ray.init`` retries an unreachable address for many minutes, printing only warnings, so a mistyped
    address or a cluster that is down would look like a slow start. ``auto`` and other forms are left to Ray.

    :raises StudyError: naming the address and what the connection attempt said.
    """
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, OverflowError) as exc:  # refused, no route, unknown host, timed out; a port past 65535
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise StudyError(f"cannot reach Ray at {address}: {reason}; is the cluster up (`ray start --head` "
                         "prints its address) and is that port open from here?") from None


def run_ray(jobs: Sequence[Job], address: str | None = None, workers: int | None = None,
            cpus_per_run: float = 1.0, gpus_per_run: float = 0.0, display: Display | None = None,
            init: Callable[..., Any] | None = None) -> Outcome:
    """Run ``jobs`` as Ray tasks.

    :param address: a Ray cluster's address, ``auto`` for the one started here with ``ray start``,
        or None for a new local instance (of ``workers`` CPUs, default all).
    :param cpus_per_run: each task's ``num_cpus`` request.
    :param gpus_per_run: each task's ``num_gpus`` request (runs then need ``device=cuda`` in their config).
    :param init: called instead of ``ray.init`` when given (tests connect to their own instance).
    """
    ray = import_ray()
    display = display or Display("study", len(jobs), 0)
    started_here = False
    if not ray.is_initialized():
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            options["address"] = address
        elif workers:
            options["num_cpus"] = workers
        try:
            (init or ray.init)(**options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise StudyError(f"cannot connect to Ray{f' at {address}' if address else ''}: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        started_here = True
    task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)(_ray_execute)
    pending = {task.remote(job): job for job in jobs}
    results: list[JobResult] = []
    stopped: str | None = None
    level = 0
    started = time.time()
    try:
        with stop_signals_as_interrupt() as received:
            while pending:
                try:
                    ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                    for ref in ready:
                        job = pending.pop(ref)
                        try:
                            result = ray.get(ref)
                        except Exception as exc:  # noqa: BLE001 - a task that died (node lost, worker killed)
                            result = JobResult(job.key, "failed", f"Ray task failed: {str(exc).splitlines()[0]}")
                        results.append(result)
                        _report(display, result)
                    running = [job for job in pending.values() if _log_touched_since(job, started)]
                    display.update(display.done_before + sum(r.status == "done" for r in results), running,
                                   len(pending) - len(running), sum(r.status == "failed" for r in results))
                except KeyboardInterrupt:
                    stopped = received[-1] if received else "SIGINT"
                    level = min(2, level + 1)
                    # The stop file reaches tasks on every node (shared file system); tasks that have
                    # not started yet see it and return at once. Written before any output.
                    for job in pending.values():
                        if job.stop_file:
                            request_stop(job.stop_file, level)
                            break
                    display.message("stopping: asked the running runs to checkpoint and exit (Ctrl-C again to abort "
                                    "them)" if level == 1 else "aborting the running runs (their last checkpoints "
                                    "are intact)")
    finally:
        display.close()
        if started_here:
            ray.shutdown()
    return Outcome(results, stopped)


def _log_touched_since(job: Job, since: float) -> bool:
    """Whether a job has started in this session (its log was written to since ``since``) and is not done."""
    try:
        touched = Path(job.log).stat().st_mtime >= since
    except OSError:
        return False
    return touched and not job_state(job).done
