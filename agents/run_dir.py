"""Run directories: where a run may write, who may write there, and the key that signs env snapshots.

The guarantees the trainer builds on (README, "Interrupting and resuming"):

- A new run never writes into a directory that holds a run (``holds_run``): the default name
  takes the next free suffix (``runs/<name>``, ``runs/<name>_2``, ...), an explicit directory
  holding a run is refused with a message naming ``--resume``.
- One process at a time writes into a run directory: ``RunLock`` takes an OS advisory lock
  (``fcntl.flock``) on ``<run_dir>/.lock``. The kernel drops it when the process ends, however it
  ends, so a ``kill -9`` leaves no stale lock. Under ``torchrun`` only rank 0 (environment variable
  ``RANK``) writes, so only rank 0 takes it.
- Temporary files are named ``.<target>.<pid>.<random>.tmp`` and renamed over their target; those
  a killed write left behind are removed when the run starts again (under the lock).
- The snapshot key (``snapshot_key_path``) is checked when a run starts; if it cannot be used the
  run warns once and only skips the env snapshot.
- A command-line output file or folder (``evaluate.py``'s ``--json``, ``--plot``, ``--video``, the
  benchmarks' ``--json``) is checked before the long work that fills it (``output_file_problem``,
  ``output_folder_problem``): an existing file is never replaced unless asked, a missing folder is
  made when the output is written.

This module imports no torch, so ``train.py`` checks the run directory before the heavy imports.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are then not protected against a second process
    fcntl = None  # type: ignore[assignment]

# What a run writes into its directory: any of them present means the directory holds a run.
RUN_FILES: tuple[str, ...] = ("checkpoint.pt", "config.yaml", "metrics.jsonl", "envs_state.pkl", "tb", "checkpoints")
LOCK_FILE = ".lock"
KEY_SIZE = 32


class RunDirError(RuntimeError):
    """A run directory that cannot be used: holds another run, is locked, or is not a writable directory."""


class SnapshotKeyError(OSError):
    """The snapshot key cannot be read, created, or is not a key (wrong length)."""


def cli_path(text: str) -> Path:
    """An argparse ``type`` for a path option: refuses an empty string (an unset shell variable, as in
    ``--run-dir "$OUT"``), which ``Path`` would read as the current directory."""
    if not text.strip():
        import argparse

        raise argparse.ArgumentTypeError("an empty path; give a file or folder name")
    return Path(text)


def holds_run(run_dir: str | Path) -> list[str]:
    """The names of ``RUN_FILES`` present in ``run_dir`` (empty: no run there)."""
    run_dir = Path(run_dir)
    try:
        return [name for name in RUN_FILES if (run_dir / name).exists()] if run_dir.is_dir() else []
    except OSError:  # a name too long, no permission: prepare_run_dir reports it
        return []


def default_run_dir(name: str, root: str | Path = "runs") -> Path:
    """``root/name`` if it holds no run, else the first of ``root/name_2``, ``root/name_3``, ... that does not."""
    root = Path(root)
    check_run_dir_path(root / name)  # a name too long for the file system fails every suffix: say so once
    candidate, suffix = root / name, 1
    while holds_run(candidate) or (candidate.exists() and not candidate.is_dir()):
        suffix += 1
        candidate = root / f"{name}_{suffix}"
    return candidate


def refuse_existing_run(run_dir: str | Path) -> None:
    """Raise RunDirError if ``run_dir`` holds a run: a new run must not replace or mix with its files."""
    found = holds_run(run_dir)
    holder = lock_holder(run_dir) if found else None
    if holder is not None:
        raise RunDirError(f"{run_dir} holds a run that another training process (pid {holder}) is training now; "
                          "give a new run another --run-dir")
    if found and "checkpoint.pt" in found:
        raise RunDirError(f"{run_dir} already holds a run ({', '.join(found)}); continue it with "
                          f"`python {train_py()} --resume {run_dir}`, or give a new run another --run-dir")
    numbered = list(_numbered_checkpoints(Path(run_dir, "checkpoints")).values()) if found else []
    if numbered:  # checkpoint.pt gone (moved away or deleted): the numbered ones remain
        raise RunDirError(f"{run_dir} already holds a run with numbered checkpoints but no checkpoint.pt (newest "
                          f"{numbered[-1]}); to continue it, copy that file to {Path(run_dir) / 'checkpoint.pt'} "
                          f"and run `python {train_py()} --resume` on the folder, or give a new run another --run-dir")
    if found:  # a run stopped before its first checkpoint: nothing to resume, but its files are kept
        raise RunDirError(f"{run_dir} already holds a run that wrote no checkpoint ({', '.join(found)}), so "
                          "--resume cannot continue it; delete that directory or give a new run another --run-dir")


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def nearest_existing(path: Path) -> Path:
    """``path`` itself or its nearest parent that exists (``.`` when none does): where creating ``path`` starts, and
    what is in its way when that is a file. A path whose existence cannot be asked (Python 3.11's ``exists()``
    raises for a name too long or a folder that may not be searched) counts as absent: creating it says why."""
    def exists(candidate: Path) -> bool:
        try:
            return candidate.exists()
        except OSError:
            return False

    return next((candidate for candidate in (path, *path.parents) if exists(candidate)), Path("."))


def check_run_dir_path(run_dir: str | Path) -> None:
    """Refuse a run directory path that cannot be one: a file, a path under a file, a name too long.

    :raises RunDirError: one line naming the problem.
    """
    run_dir = Path(run_dir)
    existing = nearest_existing(run_dir)
    limit = _name_max(existing if existing.is_dir() else existing.parent)
    too_long = [part for part in run_dir.parts if len(os.fsencode(part)) > limit]
    if too_long:
        raise RunDirError(f"cannot use that run directory: the name {too_long[0][:40]}... is "
                          f"{len(os.fsencode(too_long[0]))} bytes, longer than the {limit} this file system allows")
    if existing == run_dir and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} is a file, not a directory; choose another --run-dir")
    if not existing.is_dir():
        raise RunDirError(f"cannot use run directory {run_dir}: {existing} is a file, not a directory")


def prepare_run_dir(run_dir: str | Path) -> Path:
    """Create ``run_dir`` if needed and check that this process can write there.

    :return: the directory.
    :raises RunDirError: one line naming the problem: the path is a file, lies under a file, has a
        component longer than the file system allows, or cannot be created or written.
    """
    run_dir = Path(run_dir)
    check_run_dir_path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create run directory {run_dir}: {exc.strerror or exc}") from None
    try:
        probe = run_dir / f".write-test.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        probe.touch()
        probe.unlink(missing_ok=True)  # a run starting there may have swept it away as a stale temp file
    except OSError as exc:
        raise RunDirError(f"cannot write in run directory {run_dir}: {exc.strerror or exc}") from None
    return run_dir


def remove_stale_temp_files(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files killed writes left in ``run_dir`` and ``run_dir/checkpoints``.

    Only call this while holding the run's lock: then no live process is writing them.
    :return: the files removed.
    """
    removed = []
    for directory in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            if _is_temp_name(path.name, directory) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


# temp_path's names: .<target>.<pid>.<8 hex digits>.tmp
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.\d+\.[0-9a-f]{8}\.tmp")
# The files earlier versions wrote through a fixed ``.<name>.tmp``: a run's own files only.
_LEGACY_TARGET = re.compile(r"checkpoint\.pt|checkpoint_\d+\.pt|config\.yaml|metrics\.jsonl|envs_state\.pkl|"
                            r"provenance\.json")


def _is_temp_name(name: str, directory: Path) -> bool:
    """Whether ``name`` is a temporary file of this package's writes: :func:`temp_path`'s pattern, or an
    earlier version's fixed ``.<target>.tmp`` / ``.checkpoint.pt.link`` next to the file it was writing.
    Any other dot file (a user's ``.notes.tmp``, or ``.notes.txt.tmp`` beside their ``notes.txt``) is left alone."""
    if _TEMP_NAME.fullmatch(name) or name == ".checkpoint.pt.link":
        return True
    target = name[1:-len(".tmp")]
    return (name.startswith(".") and name.endswith(".tmp") and _LEGACY_TARGET.fullmatch(target) is not None
            and (directory / target).is_file())


def temp_path(path: Path) -> Path:
    """A temporary name next to ``path``, unique per process and call: ``.<name>.<pid>.<random>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def script_as_started(name: str) -> str:
    """The script ``name`` (``train.py``, ``study.py``) as this process was started with it (``python
    /opt/repo/train.py`` from another folder), for the commands messages print; ``name`` itself when this
    process is another program (a test, a notebook, a study's worker)."""
    script = sys.argv[0] if sys.argv else ""
    return shlex.quote(script) if os.path.basename(script) == name else name


def train_py() -> str:
    """``script_as_started("train.py")``: how the resume commands in messages name train.py."""
    return script_as_started("train.py")


def _sync_folder(folder: Path) -> None:
    """``policies.checkpoint.sync_directory``, imported on first use: the command-line parsers import this
    module before any error check and must not load the ``policies`` package (tests/test_evaluate.py)."""
    from policies.checkpoint import sync_directory

    sync_directory(folder)


def _numbered_checkpoints(folder: Path) -> dict[int, Path]:
    """``policies.checkpoint.numbered_checkpoints``, imported on first use (see :func:`_sync_folder`)."""
    from policies.checkpoint import numbered_checkpoints

    return numbered_checkpoints(folder)


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed over it (all or nothing), syncing the
    file before the rename and its folder after, so the new bytes survive a power loss once this returns.

    :raises OSError: as the write raised it (``write_failure`` turns it into a message).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


class OutputExistsError(FileExistsError):
    """``atomic_output(path, replace=False)`` found a file at ``path`` when it came to put its own there
    (not any other FileExistsError of the block, such as a parent folder that is a file)."""


@contextlib.contextmanager
def atomic_output(path: Path, replace: bool = True) -> Iterator[Path]:
    """A temporary name beside ``path`` for a writer that wants a file name rather than bytes (a video or
    plot library): it replaces ``path`` when the block ends without error and is removed when it raises,
    so an old file stays whole until the new one is. The name ends in ``path``'s suffix, from which such
    writers pick the format; the folder is made if missing. The file is synced to disk before the rename
    and the folder after it, as ``atomic_write`` does, so once the block has ended a crash can bring
    back neither an empty file nor the old one.

    :param replace: False to never replace a file at ``path``, even one that appeared after the caller
        checked the path (another process writing the same name): the block's file is then linked in
        only where nothing is, and :class:`OutputExistsError` raised (the block's file removed) otherwise.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp = tmp.with_name(tmp.name + path.suffix)
    try:
        yield tmp
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails on an existing path, atomically
            except FileExistsError:
                raise OutputExistsError(errno.EEXIST, "file exists", str(path)) from None
            except OSError:  # a file system without hard links: the check and the rename are two steps
                if path.exists() or path.is_symlink():
                    raise OutputExistsError(errno.EEXIST, "file exists", str(path)) from None
                os.replace(tmp, path)
        _sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_new_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as a new file, making missing folders: a file already there, even one
    that appeared after :func:`output_file_problem` checked the path, is never replaced (exclusive
    create; ``atomic_write`` is the one that replaces), and a failed write leaves no partial file.

    :raises FileExistsError: when ``path`` exists (nothing is written).
    :raises OSError: when the folder or the file cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("xb")  # from here the file is ours to remove if the write fails
    try:
        with handle:
            handle.write(data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _write_problem_words(exc: OSError) -> str:
    """An OSError in words; errors whose own words would mislead (ENOENT from /proc) say "not writable"."""
    clear = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)
    words = exc.strerror or str(exc)
    return words if exc.errno in clear else f"not a writable folder: {words}"


def output_folder_problem(folder: Path, shown: Path | None = None) -> str | None:
    """Why outputs cannot be written in ``folder`` (created when first written if missing), or None.

    The one check of a command-line output folder or file's folder (``evaluate.py``, the benchmarks),
    made before any long work so a typo does not surface after it. Creates nothing: a temporary file
    is made and removed in the nearest existing folder to find out whether it can be written.

    :param folder: where the outputs go.
    :param shown: the path the user gave, for the message (default ``folder``).
    :return: a message starting with the path (the caller puts its option name in front), or None.
    """
    shown = shown or folder
    try:
        existing = folder
        # A link to nothing counts as there (exists() follows links): making the folder would fail on it.
        while not (existing.exists() or existing.is_symlink()) and existing.parent != existing:
            existing = existing.parent
        if not existing.is_dir():
            what = "a link to nothing" if not existing.exists() else "a file" if existing.is_file() else "a pipe or device"
            where = f"is {what}" if existing == shown else f"is under {existing}, which is {what}"
            return f"{shown}: {where}, not a folder"
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as exc:  # a name too long, a permission on the way, ...
        return f"{shown}: cannot write in {existing} ({_write_problem_words(exc)})"
    return None


def output_file_problem(path: Path, overwrite: bool = False, overwrite_option: str | None = "--overwrite") -> str | None:
    """Why ``path`` cannot take a new output file, or None (see :func:`output_folder_problem`).

    Refused: a folder, a link, pipe or device (a write renamed over it would replace the link or the
    device itself), an existing file unless ``overwrite``, a parent folder that cannot hold it.

    :param overwrite_option: the option that allows replacing a file, named in the message (None: the
        command has none).
    """
    try:
        if path.is_dir():
            return f"{path} is a folder; give a file name"
        if path.is_symlink() or (path.exists() and not path.is_file()):
            return f"{path} is a link, pipe or device, not a regular file; give a file name"
        exists = path.exists()
    except OSError as exc:  # e.g. a name longer than the file system allows
        return f"{path}: {exc.strerror or exc}"
    if exists and not overwrite:
        if overwrite_option is None:
            return f"{path} exists; give a new file name"
        return f"{path} exists; pass {overwrite_option} to replace it, or choose another name"
    return output_folder_problem(path.parent, shown=path)


def write_failure(path: str | Path, exc: BaseException) -> str:
    """One line for a failed write: the path, why, and the free space where it was going."""
    from policies.checkpoint import free_space, write_error_reason

    return f"cannot write {path}: {write_error_reason(exc)} ({free_space(Path(path).parent)} free on its file system)"


def os_error_text(exc: OSError, where: str | Path) -> str:
    """One line for an OSError: why, and the file it names; for one that names no file (a write to an open file
    on a full disk) the folder it happened under, ``where``. A full disk adds the free space there."""
    from policies.checkpoint import free_space, write_error_reason

    named = exc.filename2 or exc.filename  # the rename's target (the file meant), else the file named
    text = f"{write_error_reason(exc)}: {named}" if named else f"{write_error_reason(exc)} (under {where})"
    if exc.errno == errno.ENOSPC:
        text += f" ({free_space(Path(named).parent if named else where)} free on its file system)"
    return text


# Looking for a holder takes the lock for an instant (``lock_holder``'s shared lock, as ``refuse_existing_run``
# and ``study.py run`` look; ``RunLock.probe``'s exclusive one, as ``train.py --resume`` looks), so a process
# that finds it taken tries again for this long before it believes a training process holds it: one
# process looking while another's run starts must not stop that run.
LOCK_RETRY_SECONDS = 0.25
_LOCK_BUSY = (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN)


def _flock(handle: IO[str], operation: int) -> OSError | None:
    """Take ``operation`` (``LOCK_SH`` or ``LOCK_EX``) on ``handle`` without blocking for longer than
    :data:`LOCK_RETRY_SECONDS`; None when taken, else the last error (errno in ``_LOCK_BUSY``: held)."""
    deadline = time.monotonic() + LOCK_RETRY_SECONDS
    while True:
        try:
            fcntl.flock(handle.fileno(), operation | fcntl.LOCK_NB)
            return None
        except OSError as exc:
            if exc.errno not in _LOCK_BUSY or time.monotonic() >= deadline:
                return exc
        time.sleep(0.01)


def open_lock_file(path: Path) -> IO[str]:
    """Open (or create) a lock file to lock and write a pid into; bytes that are not UTF-8 (someone's binary
    file of that name) read as replacement characters, which :func:`is_foreign_lock` then refuses."""
    return path.open("a+", encoding="utf-8", errors="replace")


def is_foreign_lock(text: str) -> bool:
    """Whether a lock file's first bytes are someone else's file: a lock holds a pid, or nothing yet. NULs count as
    nothing (a power loss can leave a file of them, and /dev/full reads as them)."""
    earlier = text.strip().strip("\0")
    return bool(earlier) and not earlier.isdigit()


def lock_holder(run_dir: str | Path) -> str | None:
    """The pid (as the holder wrote it in ``.lock``) of a process training in ``run_dir`` now, or None.

    Looks without creating anything: a directory without a ``.lock`` file has no holder.
    """
    path = Path(run_dir) / LOCK_FILE
    if fcntl is None:
        return None
    try:
        handle = path.open("r", encoding="utf-8", errors="replace")
    except OSError:
        return None
    with handle:
        error = _flock(handle, fcntl.LOCK_SH)
        if error is not None:
            return (handle.read().strip() or "unknown") if error.errno in _LOCK_BUSY else None
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return None


class RunLock:
    """An exclusive OS advisory lock on ``<run_dir>/.lock`` for as long as a run writes there.

    ``fcntl.flock`` locks belong to the open file: the kernel releases them when the process
    exits, even on ``kill -9``, so no stale lock survives a crash. Re-entrant within one object.

    :param run_dir: the run directory (must exist).
    :param rank: the process's rank under ``torchrun``; only rank 0 writes, so only rank 0 locks
        (others treat ``acquire`` as done). None reads torchrun's ``RANK`` (``agents.distributed.env_rank``;
        a ``RANK`` or ``WORLD_SIZE`` that is no number raises its ``DistributedError``).
    """

    def __init__(self, run_dir: str | Path, rank: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        if rank is None:
            from agents.distributed import env_rank  # here, not at the top: evaluate.py's parser imports this module

            rank = env_rank()
        self.rank = rank
        self._handle: IO[str] | None = None
        self._depth = 0

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._depth > 0

    def acquire(self) -> None:
        """Take the lock, or raise RunDirError naming the process that holds it."""
        if self._depth > 0:
            self._depth += 1
            return
        if self.rank != 0 or fcntl is None:
            self._depth = 1
            return
        path = self.run_dir / LOCK_FILE
        try:
            handle = open_lock_file(path)
        except OSError as exc:
            raise RunDirError(f"cannot lock run directory {self.run_dir}: {exc.strerror or exc}") from None
        exc = _flock(handle, fcntl.LOCK_EX)
        if exc is not None:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            if exc.errno in _LOCK_BUSY:
                raise RunDirError(f"run directory {self.run_dir} is in use by another training process "
                                  f"(pid {holder}); wait for it to end or stop it, then use "
                                  f"`python {train_py()} --resume {self.run_dir}`") from None
            raise RunDirError(f"cannot lock run directory {self.run_dir}: {exc.strerror or exc}") from None
        handle.seek(0)
        if is_foreign_lock(handle.read(64)):
            handle.close()
            raise RunDirError(f"{path} exists and is not a run lock (this package locks a run directory with a "
                              f"file of that name, and would overwrite it); move it, or choose another directory")
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")  # for the message a second process prints
        handle.flush()
        self._handle, self._depth = handle, 1

    def release(self) -> None:
        """Undo one ``acquire``; the last one unlocks."""
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0 and self._handle is not None:
            self._handle.close()  # closing the file drops the flock
            self._handle = None

    def probe(self) -> None:
        """Raise RunDirError now if another process holds the lock, or it cannot be taken (a file system
        without locks), without keeping it. A directory without a ``.lock`` has no holder: nothing is
        created there (``--resume`` of a folder that holds no run leaves it as it was)."""
        if self.held or not (self.run_dir / LOCK_FILE).is_file():
            return
        self.acquire()
        self.release()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- the snapshot key --------------------------------------------------------------------------
_WARNED: set[str] = set()


def snapshot_key_path() -> Path:
    """Where this user's snapshot key lives.

    ``$MODULAR_RL_KEY_FILE`` if set, else ``~/.cache/modular-memory-rl/snapshot.key``.
    """
    configured = os.environ.get("MODULAR_RL_KEY_FILE")
    return Path(configured) if configured else Path.home() / ".cache" / "modular-memory-rl" / "snapshot.key"


def load_snapshot_key(create: bool = True) -> bytes:
    """This user's secret key for authenticating env snapshots (32 random bytes, mode 600).

    Created atomically on first use: the bytes go to a temporary file that is then hard-linked to
    the key's name, so two processes creating it at once both end up with the same complete key.

    :param create: create the key if it does not exist.
    :raises SnapshotKeyError: if the key cannot be read or created, or is not 32 bytes (a 0-byte
        key would make every signature forgeable).
    """
    path = snapshot_key_path()
    try:
        if create and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = temp_path(path)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(os.urandom(KEY_SIZE))
                    handle.flush()
                    os.fsync(handle.fileno())
                try:
                    os.link(tmp, path)  # fails if another process linked its key first: use that one
                except FileExistsError:
                    pass
            finally:
                tmp.unlink(missing_ok=True)
        key = path.read_bytes()
    except OSError as exc:
        raise SnapshotKeyError(f"cannot use the snapshot key {path}: {exc.strerror or exc}") from None
    if len(key) != KEY_SIZE:
        raise SnapshotKeyError(f"the snapshot key {path} holds {len(key)} bytes, not {KEY_SIZE}: "
                               "not a key this package wrote (delete it to get a new one)")
    return key


def usable_snapshot_key() -> bytes | None:
    """The snapshot key, or None after a one-time warning when it cannot be used.

    Without a key a run still writes its checkpoints; it only skips the env snapshot
    (``envs_state.pkl``), so a resume starts fresh episodes.
    """
    try:
        return load_snapshot_key()
    except SnapshotKeyError as exc:
        if str(exc) not in _WARNED:
            _WARNED.add(str(exc))
            print(f"warning: {exc}. Checkpoints are written as usual, but the env snapshot (envs_state.pkl) "
                  "is skipped, so a resume starts fresh episodes; set MODULAR_RL_KEY_FILE to a writable "
                  "file to keep it", file=sys.stderr)
        return None
