"""Where lit_ti may write: a name is one path component, and every output lies inside the run folder.

`inside` is the one check every writer goes through (the atomic writer calls it): while a run folder is
active (`run_folder`, set by training), a path that resolves outside it (`../`, an absolute path, a symlink
pointing elsewhere) is refused before anything is written. Outside a run (library use, generate, preprocess)
paths are only resolved.
"""

import errno
import os
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lit_ti.errors import UserError

NAME_MAX = 255  # bytes per path component on ext4, xfs, btrfs, tmpfs, APFS, NTFS (UTF-16 units there)
STEP = "-" + "9" * 10  # the longest `-<step>` a file name carries (10 digits: 10 billion steps)

_root: Path | None = None  # the active run folder (resolved), while a run writes


class WriteFailed(UserError):
    """The user's world refused a write (disk full, read-only, name too long): not a bug, and not bad input."""


def check_name(name, key: str = "name", suffixes: tuple[str, ...] = (f"{STEP}.safetensors",)) -> str:
    """`name` as a file stem: one path component, no control characters, and short enough that
    `<name><suffix>` fits the filesystem's 255-byte limit for every suffix the method writes."""
    text = "" if name is None else str(name)
    if not text.strip() or text in (".", "..") or "/" in text or "\\" in text or os.sep in text:
        raise UserError(
            f"{key}={text!r}: a name becomes a file name, so it must be one non-empty path component "
            "(no '/', '\\', '.' or '..'); pick a plain word such as 'my-cat'"
        )
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text):
        raise UserError(f"{key}={text!r}: contains control characters; use printable characters only")
    room = NAME_MAX - max(len(s.encode()) for s in suffixes)
    if len(text.encode()) > room:
        raise UserError(
            f"{key}={text[:40]!r}...: {len(text.encode())} bytes, but file names derived from it (such as "
            f"'<name>{max(suffixes, key=len)}') must fit the filesystem's {NAME_MAX} bytes; use at most {room}"
        )
    return text


@contextmanager
def run_folder(root: str | os.PathLike) -> Iterator[Path]:
    """Make `root` the folder every write must lie inside, for the duration of the block."""
    global _root
    previous, _root = _root, Path(root).resolve()
    try:
        yield _root
    finally:
        _root = previous


def inside(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """`path` resolved (symlinks followed); a UserError when it lies outside `root` (or the active run folder)."""
    base = Path(root).resolve() if root is not None else _root
    resolved = Path(path).resolve()
    if base is not None and resolved != base and base not in resolved.parents:
        raise UserError(
            f"{path}: lies outside the run folder {base} (resolved: {resolved}); lit_ti writes only inside its "
            "run folder: use a plain name, a relative path without '..', or another hydra.run.dir"
        )
    return resolved


_FIXES = {
    errno.ENOSPC: "the disk is full: free space",
    errno.EDQUOT: "the disk quota is used up: free space",
    errno.EROFS: "the folder is on a read-only filesystem: choose a writable hydra.run.dir",
    errno.EACCES: "no permission to write there: make the folder writable or choose another hydra.run.dir",
    errno.EPERM: "no permission to write there: make the folder writable or choose another hydra.run.dir",
    errno.ENAMETOOLONG: "the file name or path is too long for this filesystem: use a shorter name or hydra.run.dir",
}


def write_failed(path: str | os.PathLike, error: OSError) -> WriteFailed:
    """One line naming the file, what the system said and what to do."""
    fix = _FIXES.get(error.errno, "check the folder and the disk")
    what = error.strerror or type(error).__name__
    return WriteFailed(f"{path}: could not be written ({what}); {fix}")
