"""Checkpoint files: written atomically, read without ever running code from the file.

A checkpoint is a ``torch.save`` of a dict of tensors and plain Python types
(no pickled classes), read back with ``torch.load(weights_only=True)``, which
refuses any object that would need code to rebuild. Spaces are stored as plain
dicts (``space_to_dict``) and the policy as its constructor arguments plus a
state dict, so a file alone is enough to rebuild the policy.

torch, numpy and gymnasium are imported inside the functions that use them, so importing
``CheckpointError`` (as ``train.py`` does before validating a config) stays fast.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from gymnasium import spaces

FORMAT = "modular-memory-rl/checkpoint"
# Bump when a checkpoint written by an older version can no longer be read.
FORMAT_VERSION = 1


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GLOBAL = re.compile(r"GLOBAL (\S+)")
# The numbered checkpoints a run keeps in checkpoints/: checkpoint_<frames, 12 digits or more>.pt.
_NUMBERED = re.compile(r"checkpoint_(\d{12,})\.pt")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, truncated, foreign, unsafe or incompatible."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file whose bytes are damaged (empty, truncated, corrupt), not merely of another kind."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, no permission); the file it replaces is intact."""


def free_space(path: str | Path) -> str:
    """The free space of the file system holding ``path`` (or its nearest existing parent), for messages."""
    path = Path(path)
    for candidate in (path, *path.parents):
        try:
            free = shutil.disk_usage(candidate).free
        except OSError:
            continue
        for unit in ("bytes", "KiB", "MiB", "GiB"):
            if free < 1024 or unit == "GiB":
                return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
            free /= 1024
    return "unknown"


def underlying_os_error(exc: BaseException) -> OSError | None:
    """The OSError (with an errno) behind a failed write, following causes and contexts (torch wraps it in
    a RuntimeError; a CheckpointWriteError is raised while handling it); None if there is none."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def write_error_reason(exc: BaseException) -> str:
    """Why a write failed, in words: the OSError behind it if any."""
    os_error = underlying_os_error(exc)
    if os_error is not None:
        return "no space left on device" if os_error.errno == errno.ENOSPC else (os_error.strerror or str(os_error))
    return f"write failed ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"


def space_to_dict(space: spaces.Space) -> dict[str, Any]:
    """Describe a Gymnasium space with plain types (lists, ints, strings)."""
    from gymnasium import spaces

    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.Box):
        return {
            "type": "Box",
            "low": space.low.tolist(),
            "high": space.high.tolist(),
            "shape": list(space.shape),
            "dtype": str(space.dtype),
        }
    if isinstance(space, spaces.Dict):
        return {"type": "Dict", "spaces": {key: space_to_dict(sub) for key, sub in space.spaces.items()}}
    raise ValueError(f"cannot store observation/action space {space} in a checkpoint")


def space_from_dict(data: dict[str, Any]) -> spaces.Space:
    """Inverse of ``space_to_dict``."""
    import numpy as np
    from gymnasium import spaces

    kind = data["type"]
    if kind == "Discrete":  # gymnasium refuses an n below 1 with a ValueError
        return spaces.Discrete(data["n"], start=data.get("start", 0))
    if kind == "Box":
        dtype = np.dtype(data["dtype"])
        return spaces.Box(np.array(data["low"], dtype=dtype), np.array(data["high"], dtype=dtype), dtype=dtype)
    if kind == "Dict":
        return spaces.Dict({key: space_from_dict(sub) for key, sub in data["spaces"].items()})
    raise CheckpointError(f"unknown space type {kind!r} in checkpoint")


def non_finite_weights_problem(state_dict: Any) -> str | None:
    """``"holds non-finite weights (nan or inf in <names>), which training never saves"`` when a floating-point
    tensor of ``state_dict`` (a checkpoint's policy weights) holds a nan or an infinity, else None (also for a
    ``state_dict`` that is no mapping: loading it says what is wrong).

    Training never saves such weights (``Trainer.save`` refuses a policy with non-finite outputs), so a
    checkpoint holding them was edited or damaged after it was written; its policy cannot act.
    """
    import torch

    if not isinstance(state_dict, dict):
        return None
    broken = [name for name, value in state_dict.items()
              if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if not broken:
        return None
    return (f"holds non-finite weights (nan or inf in {', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}), "
            "which training never saves")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically.

    The bytes go to a temporary file in the same directory, which is flushed and
    fsynced and then renamed over ``path``: a kill at any moment leaves either the
    previous file or the new one, never a truncated mix.

    The temporary file is named ``.<name>.<pid>.<random>.tmp``: unique per process and call, and
    recognisable, so a run removes those a killed write left behind when it starts again.

    :param path: destination file.
    :param payload: dict of tensors and plain Python types (no objects needing code to load).
    :return: the path written.
    :raises CheckpointWriteError: if the bytes cannot be written (a full disk, no permission): the
        message names the path and the free space; ``path`` itself is left as it was.
    """
    import torch

    path = Path(path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        # mkstemp makes it 0600; a checkpoint is readable as any file written here. Best effort: a file system
        # without modes (vfat, some FUSE mounts) refuses the change, and the file stays as it is.
        if hasattr(os, "fchmod"):
            with contextlib.suppress(OSError):
                os.fchmod(fd, _NEW_FILE_MODE)
    except OSError as exc:
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {write_error_reason(exc)} "
                                   f"({free_space(path.parent)} free)") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        _before_rename_hook()
        os.replace(tmp_name, path)
    except (OSError, RuntimeError) as exc:  # torch reports a failed write as a RuntimeError
        Path(tmp_name).unlink(missing_ok=True)
        kept = "the previous file is intact" if path.exists() else "nothing was written"
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {write_error_reason(exc)} "
                                   f"({free_space(path.parent)} free on its file system); {kept}") from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    sync_directory(path.parent)
    return path


def sync_directory(folder: str | Path) -> None:
    """Persist a rename or a new name in ``folder`` (its directory entry) where the platform allows it.

    A file fsynced and then renamed over another can still come back under the old name, or not at
    all, after a power loss until the folder itself is synced. Best effort: platforms and file systems
    that cannot open or sync a folder (Windows, some network mounts) are skipped silently.
    """
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _before_rename_hook() -> None:
    """Does nothing; tests patch it to simulate a kill between the write and the rename."""


# The first bytes of what torch.save writes: a zip archive (torch >= 1.6) or a pickle (older,
# protocol 2+). Anything else is not a checkpoint whatever its name.
_CHECKPOINT_MAGIC: tuple[bytes, ...] = (b"PK\x03\x04", b"\x80")


def _not_a_checkpoint(path: Path) -> str | None:
    """Why ``path`` (an existing file) is plainly not a torch checkpoint, or None if it may be one.

    Gives YAML configs and other text their own message: torch would call them
    "truncated or corrupt", which sends the user looking for a broken download.
    """
    try:
        with path.open("rb") as file:
            head = file.read(4096)
    except OSError:
        return None  # load_checkpoint reports unreadable files
    if head.startswith(_CHECKPOINT_MAGIC):
        return None
    hint = "give the checkpoint.pt that training writes (runs/NAME/checkpoint.pt) or its run directory"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"{path} is not a torch checkpoint (it is neither a zip archive nor a pickle); {hint}"
    if path.suffix.lower() in (".yaml", ".yml") or re.search(r"^[A-Za-z_][\w.-]*:", text, re.MULTILINE):
        looks_like_config = "core" in text or "env" in text
        config_hint = " (a config? train with it: python train.py --config FILE)" if looks_like_config else ""
        return f"{path} is a YAML/text file{config_hint}, not a checkpoint; {hint}"
    return f"{path} is a text file, not a checkpoint; {hint}"


def _new_file_mode() -> int:
    """The mode ``open`` gives a new file under the process's umask (0644 under the usual 022)."""
    mask = os.umask(0)  # the only way to read it; set back at once (at import, before any thread of ours)
    os.umask(mask)
    return 0o666 & ~mask


_NEW_FILE_MODE = _new_file_mode()


def numbered_checkpoints(folder: str | Path) -> dict[int, Path]:
    """Frames -> file of the numbered checkpoints (``checkpoint_<frames>.pt``, frames in 12 or more digits) in
    ``folder``, oldest first. Other files there (a user's ``checkpoint_best.pt`` or
    ``checkpoint_000000001024_before-lr-change.pt``) are not the run's and are left out."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = _NUMBERED.fullmatch(path.name)
        if match and path.is_file():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def _check_archive(path: Path) -> None:
    """Refuse a file that cannot be read, a zip archive that is not torch's, or one whose stored data fails its
    checksum: ``torch.load`` checks no CRC, so a flipped bit in the weights would load without a word and
    give other results (a checkpoint of a few MB takes milliseconds to check).

    :raises CheckpointError: the file cannot be opened, or is another program's zip archive.
    :raises DamagedCheckpointError: its zip structure or a stored record's checksum is broken.
    """
    try:
        with path.open("rb") as file:
            is_zip = file.read(4) == _CHECKPOINT_MAGIC[0]
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if not is_zip:
        return  # an old-style pickle: torch.load reports what it makes of it
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(name.endswith("/data.pkl") for name in names):
                sb3 = " (a Stable-Baselines3 save? load it with its class's .load)" if "policy.pth" in names else ""
                raise CheckpointError(f"{path} is a zip archive but not a torch checkpoint{sb3}; give the "
                                      "checkpoint.pt that training writes (runs/NAME/checkpoint.pt) or its run directory")
            # torch.serialization.set_crc32_options(False) writes every CRC as 0: nothing to check then.
            unchecked = all(info.CRC == 0 for info in archive.infolist() if info.file_size)
            damaged = None if unchecked else archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, RuntimeError, NotImplementedError) as exc:
        # RuntimeError: an encrypted record; NotImplementedError: a compression method zipfile lacks.
        raise DamagedCheckpointError(f"cannot read checkpoint {path}: truncated or corrupt file ({exc})") from None
    if damaged is not None:
        raise DamagedCheckpointError(f"{path} is damaged: its record {damaged} fails its checksum (the file changed "
                                     "after it was written)")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` without executing code from it.

    :param path: the ``.pt`` file (or a run directory containing ``checkpoint.pt``).
    :param map_location: device for the tensors.
    :raises CheckpointError: if the file is missing, truncated, unsafe (would run code),
        not a checkpoint of this package, or from an incompatible format version.
    """
    import torch

    path = Path(path).expanduser()  # a notebook's "~/runs/x": no shell expanded it
    if path.is_dir() and path.suffix != ".pt":  # a run folder
        path = path / "checkpoint.pt"
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        # A folder of numbered checkpoints given, or a run folder whose checkpoint.pt is gone: name the numbered ones.
        numbered = ([*numbered_checkpoints(path.parent).items(), *numbered_checkpoints(path.parent / "checkpoints").items()]
                    if path.name == "checkpoint.pt" else [])
        newest = max(numbered)[1] if numbered else None
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent  # the run folder
        hint = (f" ({len(numbered)} numbered checkpoint(s) are there, the newest {newest}: give that file to load it, "
                f"or copy it to {run / 'checkpoint.pt'} to continue the run with --resume {run})" if newest else "")
        if not newest and path.name == "checkpoint.pt" and any((run / name).is_file()
                                                               for name in ("config.yaml", "metrics.jsonl")):
            hint = f" ({run} holds a run stopped before its first checkpoint: there is nothing to load or resume)"
        raise CheckpointError(f"checkpoint file not found: {path}{hint}")
    if path.stat().st_size == 0:
        raise DamagedCheckpointError(f"{path} is empty (0 bytes), not a checkpoint")
    reason = _not_a_checkpoint(path)
    if reason is not None:
        raise CheckpointError(reason)
    _check_archive(path)
    try:
        with warnings.catch_warnings():  # a stray pickle's "Detected pickle protocol" note: the error says it
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message spans many lines with terminal colour codes; keep the line naming the object.
        found = _GLOBAL.search(_ANSI.sub("", str(exc)))
        if found is None:  # not an object the safe loader refused: the bytes themselves are bad
            raise DamagedCheckpointError(f"cannot read checkpoint {path}: corrupt file or not a torch checkpoint"
                                         ) from None
        raise CheckpointError(
            f"refusing to load {path}: it contains objects that would run code when loaded "
            f"(it references {found.group(1)}); a checkpoint of this package holds only tensors and plain types"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DamagedCheckpointError(f"cannot read checkpoint {path}: truncated or corrupt file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this package (no '{FORMAT}' marker)")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version} (package {data.get('package_version')}), "
            f"but this package reads version {FORMAT_VERSION}: use the package version that wrote it"
        )
    return data
