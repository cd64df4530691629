"""`python train.py --help`: the config groups with their options, and the keys people set most, each with
the comment it carries in configs/ (so the help and the config files cannot disagree)."""

import re
from pathlib import Path

KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_]\w*):(?P<value>[^#]*?)(\s+#\s*(?P<comment>.*))?$")
DEFAULT = re.compile(r"^\s+-\s+(?:optional\s+)?(?P<group>[\w/]+):\s*(?P<option>[^#\s]+)")
FILES = {  # per entry point: (config file, the key prefix its keys get), the most used first
    "train": [
        ("train.yaml", ""),
        ("method/textual_inversion.yaml", "method."),
        ("shared/method.yaml", "method."),
        ("data/concept.yaml", "data."),
        ("trainer/default.yaml", "trainer."),
        ("callbacks/preview.yaml", "callbacks."),
    ],
}


def commented_keys(path: Path, prefix: str) -> list[tuple[str, str]]:
    """(dotted key, comment) for every key line of a YAML file that carries a comment."""
    found, stack = [], []  # stack: (indent, key) of the enclosing mappings
    for line in path.read_text(encoding="utf-8").splitlines():
        m = KEY.match(line)
        if not m or line.lstrip().startswith("#") or m["key"] == "defaults":
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = prefix + ".".join([k for _, k in stack] + [m["key"]])
        if m["comment"] and not m["key"].startswith("_"):
            found.append((key, m["comment"]))
        if not m["value"].strip():
            stack.append((indent, m["key"]))
    return found


def groups(configs: Path, config_name: str) -> list[tuple[str, list[str], str]]:
    """(group, options, default) for every group of the entry's defaults list."""
    chosen = {}
    for line in (configs / f"{config_name}.yaml").read_text(encoding="utf-8").splitlines():
        if (m := DEFAULT.match(line)) and not m["option"].startswith("$"):
            chosen[m["group"]] = m["option"]
    listed = []
    for group, default in chosen.items():
        folder = configs / group
        if group in ("paths", "hydra", "logger") or not folder.is_dir():
            continue
        listed.append((group, sorted(p.stem for p in folder.glob("*.yaml")), default))
    return listed


def help_text(configs: Path, config_name: str, script: str) -> str:
    lines = [
        f"usage: python {script} [group=option ...] [key=value ...]    (-m: a sweep over comma-separated values)",
        "",
        "Config groups (group=option; the default in brackets):",
    ]
    for group, names, default in groups(configs, config_name):
        lines.append(f"  {group:<15} {', '.join(names)}  [{default}]")
    keys = [
        kv
        for name, prefix in FILES.get(config_name, [(f"{config_name}.yaml", "")])
        for kv in commented_keys(configs / name, prefix)
    ]
    if keys:
        lines += ["", "Keys (key=value; every key of a run: --cfg job):"]
        width = min(36, max(len(k) for k, _ in keys) + 2)
        lines += [f"  {k:<{width}}{comment}" for k, comment in keys]
    lines += ["", "README.md has the commands for each method; Hydra's own options: --hydra-help"]
    return "\n".join(lines)
