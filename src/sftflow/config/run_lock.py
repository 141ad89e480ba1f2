"""Run dirs are owned: one writer at a time (a training run, or an export into its export_dir).

The owner holds an OS lock (`fcntl.flock`) on `DIR/.sftflow.lock` for as long as it writes there, and the
file records who it is (pid, host, start time, command) so a second writer is told whom to wait for. The
kernel drops the lock when the owner dies, even by SIGKILL, so a killed run never blocks its own resume:
the next claimant takes the lock over and logs the dead owner it replaced.

A record naming another host cannot be checked from here (flock over a network filesystem may not reach
that host), so it is refused unless that host's process is gone and the user deletes the lock file.

Under torchrun / accelerate every rank of one job writes the same output_dir: rank 0 claims it and the
record carries the job's rendezvous (`job_token`), so the other ranks accept their own job's owner and
refuse anyone else's.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from sftflow.errors import SftflowError

logger = logging.getLogger(__name__)

LOCK_NAME = ".sftflow.lock"


@dataclass(frozen=True)
class Owner:
    """Who holds a run dir, as its lock file records it."""

    pid: int
    host: str
    started: str  # local time, ISO 8601
    command: str  # "sftflow train", "sftflow export"
    job: str | None = None  # the distributed job's rendezvous; None for a single process

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.started} (started by {self.command!r})"


# dir (resolved) -> (open lock file descriptor, our record): the claims this process holds
_HELD: dict[str, tuple[int, Owner]] = {}


def job_token(env: Mapping[str, str] | None = None) -> str | None:
    """The rendezvous every rank of one torchrun / accelerate / deepspeed job shares, None outside one."""
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE") or 1) <= 1:
        return None
    parts = [env.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")]
    return ":".join(parts) if any(parts) else None


def lock_path(directory: str | Path) -> Path:
    return Path(directory) / LOCK_NAME


def read_owner(directory: str | Path) -> Owner | None:
    """The owner recorded in `directory`'s lock file (None: no file or an unreadable one)."""
    try:
        data = json.loads(lock_path(directory).read_text(encoding="utf-8"))
        return Owner(**{k: data.get(k) for k in ("pid", "host", "started", "command", "job")})
    except (OSError, ValueError, TypeError):
        return None


def holds(directory: str | Path) -> bool:
    """Whether this process holds `directory`."""
    return _key(directory) in _HELD


def check_writable_dir(directory: str | Path, key: str) -> Path:
    """`directory` as a Path, refused when it exists and is not a directory.

    Raises:
        SftflowError: `directory` is a file (or another non-directory).
    """
    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise SftflowError(
            f"{key} {path} is a file, not a directory. Choose a directory path for {key} (or move the file)."
        )
    return path


def claim(directory: str | Path, command: str, key: str = "output_dir") -> Owner:
    """Take ownership of `directory` (creating it) for this process, until `release` or process exit.

    Claiming a dir this process already holds is a no-op. A stale lock (its owner on this host is gone) is
    taken over with a log line.

    Raises:
        SftflowError: another live process owns the dir (naming it), a record names another host, the dir
            is a file, or it cannot be created.
    """
    path = check_writable_dir(directory, key)
    if holds(path):
        return _HELD[_key(path)][1]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SftflowError(
            f"{key} {path} cannot be created: {exc.strerror or exc}. Choose a writable directory."
        ) from None
    owner = Owner(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%dT%H:%M:%S"), command, job_token())
    while True:
        fd = _open_lock(path, key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # e.g. some network filesystems
                _refuse_live_record(path, key, fd)
                logger.warning(
                    "%s: its filesystem has no file locks; the owner record alone guards it.", path
                )
                break
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise SftflowError(_in_use(path, key, _written_owner(path))) from None
        if _same_file(fd, lock_path(path)):
            break
        os.close(fd)  # the previous owner removed the file between our open and our lock: try again
    previous = read_owner(path)
    if previous is not None and previous.host != owner.host:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        raise SftflowError(
            _in_use(path, key, previous)
            + f" That host's process cannot be checked from {owner.host}: if it no longer runs, delete "
            f"{lock_path(path)} and start again."
        )
    if previous is not None and previous.pid != owner.pid:
        logger.warning(
            "%s: taking over from %s, which no longer holds it (it was killed or crashed).",
            path,
            previous.describe(),
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(asdict(owner)) + "\n").encode(), 0)
    os.fsync(fd)
    _HELD[_key(path)] = (fd, owner)
    return owner


def check_job_owner(directory: str | Path, key: str = "output_dir") -> None:
    """For a rank other than 0: refuse `directory` when its recorded owner is a live writer outside this
    job (rank 0 was refused, so this rank must stop too). No record: rank 0 holds it or reported why not.

    Raises:
        SftflowError: another job or process owns the dir.
    """
    owner = read_owner(directory)
    mine = job_token()
    if owner is None or (mine is not None and owner.job == mine):
        return
    if _lock_is_free(Path(directory)):
        return  # a dead owner's record; rank 0 took it over or stopped with its own error
    raise SftflowError(_in_use(Path(directory), key, owner))


def release(directory: str | Path) -> None:
    """Give up this process's claim on `directory` (its lock file is removed); no-op when not held."""
    held = _HELD.pop(_key(directory), None)
    if held is None:
        return
    fd, _ = held
    with contextlib.suppress(OSError):
        if _same_file(fd, lock_path(directory)):
            lock_path(directory).unlink()
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def owned(directory: str | Path, command: str, key: str = "output_dir") -> Iterator[Owner]:
    """`claim` for the duration of a block (released after it unless this process held it before)."""
    held_before = holds(directory)
    owner = claim(directory, command, key)
    try:
        yield owner
    finally:
        if not held_before:
            release(directory)


@atexit.register
def _release_all() -> None:
    """A normal exit removes this process's lock files (the kernel drops the locks in any case)."""
    for directory in list(_HELD):
        release(directory)


def is_lock_file(path: Path) -> bool:
    """Whether `path` is a run dir's lock file (not a run output: emptiness checks skip it)."""
    return path.name == LOCK_NAME


def _written_owner(path: Path, wait_s: float = 2.0) -> Owner | None:
    """The lock's record, waiting briefly for it: the holder writes it just after taking the lock, so a
    process refused in between would otherwise read an empty file."""
    deadline = time.monotonic() + wait_s
    while (owner := read_owner(path)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return owner


def _in_use(path: Path, key: str, owner: Owner | None) -> str:
    who = owner.describe() if owner else "another process (its lock file holds no record)"
    return (
        f"{key} {path} is in use by {who}; wait for it to finish or stop it, or choose another {key}. "
        "overwrite_output_dir never writes over a dir another process owns."
    )


def _refuse_live_record(path: Path, key: str, fd: int) -> None:
    """Without flock: refuse when the record names a live process on this host other than this one."""
    owner = read_owner(path)
    if owner is None or owner.host != socket.gethostname() or owner.pid == os.getpid():
        return
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass  # alive, another user's
    os.close(fd)
    raise SftflowError(_in_use(path, key, owner))


def _open_lock(path: Path, key: str) -> int:
    try:
        return os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise SftflowError(
            f"{key} {path}: cannot create its lock file {lock_path(path)}: {exc.strerror or exc}. "
            "Choose a writable directory."
        ) from None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _lock_is_free(path: Path) -> bool:
    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the shared lock we may have taken
    return True


def _key(directory: str | Path) -> str:
    return os.path.realpath(Path(directory).expanduser())
