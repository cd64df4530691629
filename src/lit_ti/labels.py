"""Run-folder names built from what the user typed: `${lit_ti.label:...}` (one safe path component).

A run's folder says what it is (`<date>-<method>`, sweep jobs `<num>-<key=value,...>`), but the values are the
user's: a name or an override may hold `/`, `..`, control characters or a whole path. Every label is therefore
one path component of safe characters, bounded in length; path-valued keys are left out (their value says
where, not what, and would only be cut).
"""

import re
import unicodedata

SAFE = re.compile(r"[^A-Za-z0-9._=,+@-]+")  # anything else becomes "_" (separators, spaces, quotes, controls)
MAX_KEY = 40  # characters of one key in a label
MAX_VALUE = 24  # characters of one value in a label
MAX_LABEL = 150  # characters of a whole label (file systems allow 255 bytes per component)
# keys whose values are paths or the run's own plumbing: never part of a label (name and method are in the
# folder's path already)
EXCLUDED_GROUPS = ("hydra.", "paths.")
EXCLUDED_KEYS = ("name", "method", "ckpt_path")
PATH_KEYS = ("dir", "path", "dirpath", "save_dir", "init_file", "filename", "file")


def component(text: object, limit: int = MAX_LABEL) -> str:
    """`text` as one safe path component: no separators, no `..`, no control or non-ASCII characters, at most
    `limit` characters (a long text keeps its start and end); never empty, never `.` or `..`."""
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode()
    text = SAFE.sub("_", text)
    text = re.sub(r"\.{2,}", "_", text).strip("._-") or "_"
    if len(text) > limit:
        keep = (limit - 1) // 2
        text = f"{text[:keep]}~{text[-(limit - 1 - keep) :]}"
    return text


def _kept(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return (
        "=" in override
        and not key.startswith(EXCLUDED_GROUPS)
        and key not in EXCLUDED_KEYS
        and key.split(".")[-1] not in PATH_KEYS
    )


def label(overrides=(), *prefix: object) -> str:
    """`${lit_ti.label:${hydra.overrides.task},${hydra.job.num}}`: the prefix parts, then the overrides as
    `key=value,...` (the key's last part; path-valued keys left out, each value shortened), joined by `-`; one
    safe component."""
    parts = [component(p, MAX_VALUE) for p in prefix if p is not None and str(p) != ""]
    pairs = []
    for o in overrides or ():
        if _kept(str(o)):
            key, value = str(o).lstrip("+~").split("=", 1)
            # the key's last part (`lr`, not `method.optimizer.lr`): the folder is a name, the record is .hydra/
            pairs.append(f"{component(key.split('.')[-1], MAX_KEY)}={component(value, MAX_VALUE)}")
    if pairs:
        parts.append(",".join(pairs))
    return component("-".join(parts) or "run")
