"""One lock per output directory, so two runs cannot write the same outputs, and ``--restart``'s moving aside.

The lock is a file beside the directory (``<parent>/.<name>.lock``, created with O_EXCL) holding who took it:
host, pid, command line and start time. A second run on the same directory gets an :class:`OutputError` naming
that holder. A lock whose process is gone on this host (a killed run) is stale: it is taken over with a warning.
A lock held from another host cannot be checked; the error says how to remove it when that run is known to be dead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from raysafe.errors import OutputError

log = logging.getLogger(__name__)


def lock_path(directory: str | os.PathLike) -> Path:
    d = Path(directory).resolve()
    return d.parent / f".{d.name}.lock"


def _holder() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": " ".join(sys.argv) or sys.executable,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(h: dict) -> str:
    return f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')}: {h.get('command')}"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written by its holder right now, or damaged


def _try_create(path: Path, me: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def acquire(directory: str | os.PathLike, what: str) -> Path:
    """Take the lock of ``directory`` (``what`` names the outputs in messages); returns the lock file."""
    path = lock_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = _holder()
    for _ in range(50):
        if _try_create(path, me):
            return path
        held = _read(path)
        if held is None:  # released between our two calls
            continue
        if not held:  # its holder is writing it: give it a moment
            time.sleep(0.05)
            held = _read(path)
            if held is None:
                continue
            if not held:
                raise OutputError(
                    f"the lock of {what} is unreadable",
                    where=str(path),
                    fix="if no run is using that directory, delete the lock file and run again",
                )
        if held.get("host") == me["host"] and isinstance(held.get("pid"), int) and not _alive(held["pid"]):
            log.warning("taking over the stale lock of %s (its holder is gone: %s)", what, _describe(held))
            # replace it by rename: two runs taking over at once both rename and the later one wins, so each
            # checks again after a moment that the lock names it
            tmp = path.with_name(f"{path.name}.{me['pid']}")
            tmp.write_text(json.dumps(me))
            os.replace(tmp, path)
            time.sleep(0.2)
            if _read(path) == me:
                return path
            continue
        raise OutputError(
            f"{what} is being written by another run ({_describe(held)})",
            where=str(Path(directory)),
            fix="wait for that run to finish, or give this run another output directory; if that run is dead "
            f"(e.g. on another host), delete {path}",
        )
    raise OutputError(f"could not take the lock of {what}", where=str(path), fix="run again")


def release(path: Path) -> None:
    held = _read(path)
    if held and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike, what: str) -> Iterator[Path]:
    """``with output_lock(dir, "training run x"):`` — hold ``dir``'s lock for the duration of the block."""
    path = acquire(directory, what)
    try:
        yield path
    finally:
        release(path)


def move_aside(directory: str | os.PathLike) -> Path | None:
    """``--restart``: rename ``directory`` to ``<name>.replaced-<UTC time>`` beside it (nothing is deleted);
    returns the new name, or None when there was nothing to move."""
    d = Path(directory)
    if not d.exists():
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = d.with_name(f"{d.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = d.with_name(f"{d.name}.replaced-{stamp}-{n}")
    os.replace(d, target)
    log.warning("--restart: moved the old outputs %s aside to %s", d, target)
    return target
