"""Atomic file writes: a reader (or a crash) never sees a half-written output.

Temp files are named `.<file>.lit_ti-<host>-<pid>-<random>.tmp`: the marker says lit_ti made them, and the
host and pid say whose they are, so a later run removes only the ones whose writer is gone (never a
concurrent run's, never a user's file that merely ends in `.tmp`).
"""

import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lit_ti.io.paths import NAME_MAX, inside, write_failed

_UMASK = os.umask(0)
os.umask(_UMASK)
HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
TEMP = re.compile(r"^\..*\.lit_ti-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[a-z0-9_]+\.tmp$", re.DOTALL)


def temp_prefix(name: str) -> str:
    """The temp-file prefix for the output file `name`; the whole temp name stays within NAME_MAX bytes."""
    tail = f".lit_ti-{HOST}-{os.getpid()}-"
    room = NAME_MAX - len(tail.encode()) - len("XXXXXXXX.tmp") - 1  # mkstemp adds 8 characters, then .tmp
    short = name.encode()[:room].decode(errors="ignore")  # a cut never splits a character
    return f".{short}{tail}"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temp file lives in the same directory so `os.replace` is a same-filesystem atomic rename. The path
    must lie inside the active run folder (`lit_ti.io.paths.inside`); a write the system refuses (disk full,
    read-only, name too long) raises `WriteFailed`, one line naming the file.
    """
    path = inside(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        raise write_failed(path, e) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folders: Iterable[str | os.PathLike]) -> list[Path]:
    """Delete lit_ti temp files whose writer (on this host) has died, in `folders` only (not below them):
    a killed run's temp files never replaced an output."""
    stale = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = TEMP.match(p.name)
            if m and m["host"] == HOST and not alive(int(m["pid"])) and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                stale.append(p)
    return stale
