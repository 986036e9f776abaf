"""Safety of a run directory: whose it is, who writes it now, and what an interrupted run left behind.

- The mark: `.peftlab-run` says peftlab made the folder, so its stage folders (data/, train/<method>/,
  eval/<model>/, plots/) may be replaced. A non-empty folder without it is refused: it may hold a
  user's own files under those names. A folder of an older peftlab (config.resolved.yaml, or an
  env.json of ours) is taken as ours and marked.
- The lock: `.peftlab.lock` names the one process writing the folder (pid, host, command, start time).
  It is an advisory `flock` on that file, which the kernel drops when the holder dies, so a later
  run takes over from a killed one without anyone deleting anything. Where the filesystem has no
  `flock`, a lock whose pid is dead on this host is taken over.
- Leftovers: `.<name>.tmp-<pid>` and `.<name>.old-<pid>` entries (rundir.atomic_dir, write_json)
  whose process is dead are removed when a writing command starts.

Under torchrun only rank 0 claims the folder; the other ranks write nothing of their own there.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from peftlab.errors import UserError

MARK = ".peftlab-run"
LOCK = ".peftlab.lock"
LEFTOVER = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")

# Folders this process holds the lock of (a study's stages claim the folder the study holds).
_held: dict[Path, int] = {}


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, *, create: bool = True) -> Iterator[Path]:
    """Hold `run_dir` for writing: check (or make) the mark, take the lock, remove dead leftovers."""
    run_dir = Path(run_dir)
    if int(os.environ.get("RANK", 0)) != 0:
        yield run_dir
        return
    key = run_dir.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield run_dir
        finally:
            _held[key] -= 1
        return
    _ensure_ours(run_dir, create)
    lock = _take_lock(run_dir)
    _held[key] = 1
    try:
        remove_leftovers(run_dir)
        yield run_dir
    finally:
        del _held[key]
        _release_lock(run_dir, lock)


# ---------------------------------------------------------------------------------------------
# The mark


def is_marked(run_dir: Path) -> bool:
    return (run_dir / MARK).is_file()


def _has_provenance(run_dir: Path) -> bool:
    """Written by peftlab: its resolved config, its prepared data (stats.json beside its fingerprint), or an
    env.json of ours (a peftlab from before the mark)."""
    if (run_dir / "config.resolved.yaml").is_file():
        return True
    if (run_dir / "data" / "stats.json").is_file() and (run_dir / "data" / "fingerprint.json").is_file():
        return True
    try:
        env = json.loads((run_dir / "env.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(env, dict) and {"versions", "command"} <= env.keys()


def _ensure_ours(run_dir: Path, create: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: is a file, not a run directory")
    if not run_dir.exists():
        if not create:
            raise UserError(f"{run_dir}: no such run directory")
        _filesystem(run_dir, lambda: run_dir.mkdir(parents=True))
    elif not is_marked(run_dir) and any(run_dir.iterdir()) and not _has_provenance(run_dir):
        raise UserError(
            f"{run_dir}: not empty and not a peftlab run directory (no {MARK}); peftlab would replace"
            " data/, train/, eval/ and plots/ there: choose a new or empty folder for --out"
        )
    if not is_marked(run_dir):
        _filesystem(run_dir, lambda: (run_dir / MARK).write_text(
            "This folder is a peftlab run directory: peftlab replaces its stage folders.\n", encoding="utf-8"))


def _filesystem(path: Path, action) -> None:
    try:
        action()
    except OSError as exc:
        raise UserError(f"{path}: cannot write there ({exc.strerror or exc})") from None


# ---------------------------------------------------------------------------------------------
# The lock


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
            f" ({holder.get('command')})")


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _busy(run_dir: Path, holder: dict) -> UserError:
    return UserError(f"{run_dir}: another peftlab is writing this run directory ({_describe(holder)});"
                     " wait for it to finish, or use another --out")


def _take_lock(run_dir: Path) -> int:
    """Open and lock `.peftlab.lock`; the file descriptor holds the lock until `_release_lock`."""
    path = run_dir / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"{path}: cannot write there ({exc.strerror or exc})") from None
        try:
            locked = _flock(fd)
        except OSError:
            os.close(fd)
            raise
        if locked is False:
            os.close(fd)
            raise _busy(run_dir, _read_holder(path))
        if locked is None:  # no flock on this filesystem: trust the recorded pid
            holder = _read_holder(path)
            if (holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
                    and holder["pid"] != os.getpid() and _process_alive(holder["pid"])):
                os.close(fd)
                raise _busy(run_dir, holder)
        # The holder before us may have removed the file between our open and our lock: lock the file
        # that is at the path now.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)
    return fd


def _flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: this filesystem cannot lock."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return True


def _release_lock(run_dir: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        (run_dir / LOCK).unlink()  # while still holding it: a waiting opener re-checks the path
    os.close(fd)


# ---------------------------------------------------------------------------------------------
# Leftovers of killed runs


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Remove peftlab's temporary entries (`.<name>.tmp-<pid>`, `.<name>.old-<pid>`) whose process is
    dead, anywhere in the marked run directory; return what was removed."""
    if not is_marked(run_dir):
        return []
    removed = []
    for folder, dirs, files in os.walk(run_dir):
        for name in [*dirs, *files]:
            match = LEFTOVER.match(name)
            if not match:
                continue
            pid = int(match.group(1))
            if pid == os.getpid() or _process_alive(pid):
                continue
            path = Path(folder) / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        dirs[:] = [d for d in dirs if not LEFTOVER.match(d)]
    return removed
