"""The command line before Hydra: mistakes Hydra would answer with a traceback or advice that fails get one
`error:` line with the fix (exit 2), and `--help` describes lit_ti's own config, not Hydra's.

`train.py`, `generate.py` and `preprocess.py` call `entry(config_name, task)`: the overrides are composed
once up front (as `python train.py ... --cfg job` would); only when that succeeds does Hydra run the task.
"""

import difflib
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from lit_ti.errors import UserError

VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--info", "--experimental-rerun"}
OWN_CONFIG_FLAGS = {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir"}


def overrides_of(argv: list[str]) -> list[str] | None:
    """The key=value overrides of a command line (None when it names another config: nothing to check)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.split("=")[0] in OWN_CONFIG_FLAGS:
            return None
        elif a.startswith("-"):
            skip = a in VALUE_FLAGS and a != "--info"
        else:
            out.append(a)
    return out


PROMPT_KEYS = re.compile(r"^\+?(?:[\w.]+\.)?(?:negative_)?prompt=")
BARE_VALUE = re.compile(r"[\w/.:+@%-]+")  # a value Hydra's grammar reads back as typed


def hydra_literal(key: str, value: str, always: bool = False) -> str:
    """`key=value` as an override Hydra reads back as the string `value`: quoted (Hydra's quoted strings: a
    backslash run before a quote or at the end doubled, quotes escaped) unless it is a path of bare-safe
    characters and not `always`. Run folders are named `...-seed=0,lr=0.01`: bare, `=` and `,` would be a parse error or a sweep."""
    if BARE_VALUE.fullmatch(value) and "/" in value and not always:  # a path (bare `0`, `null` are no strings)
        return f"{key}={value}"
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return f"{key}='" + value.replace("'", "\\'") + "'"


def shell_word(text: str) -> str:
    """`text` as one shell word to paste: in double quotes when that needs no escapes (`"lora='a=b,c'"`, the
    form Hydra's docs show), else `shlex.quote`."""
    if text == shlex.quote(text) or any(c in text for c in '"$`\\!'):
        return shlex.quote(text)
    return f'"{text}"'


def quote_literals(argv: list[str]) -> list[str]:
    """Values users type as text, quoted for Hydra, whose grammar reads a comma as a sweep, `=` as a syntax
    error, brackets as a list and `0` as a number. Only in a single run; a value already quoted is left alone.

    * Prompts (`prompt=a photo of my-cat, by my-style`, `(word:1.2)`, `[name]`, `0`) are always strings.
    * A value that names an existing file or folder is that path (`lora=outputs/x/<run>/x-lora.safetensors`,
      where lit_ti's own run folders are named `...-seed=0,lr=0.01`).
    """
    if "-m" in argv or "--multirun" in argv:
        return argv
    out = []
    for a in argv:
        key, _, value = a.partition("=")
        unquoted = bool(value) and value[:1] not in "'\"" and not a.startswith("-")
        if unquoted and PROMPT_KEYS.match(a):  # `prompt=1girl`, `prompt=0`, `prompt=null` are strings too
            a = hydra_literal(key, value, always=True)
        elif unquoted and not BARE_VALUE.fullmatch(value) and "${" not in value and Path(value).exists():
            a = hydra_literal(key, value)
        out.append(a)
    return out


def unintended_sweeps(overrides: list[str]) -> None:
    """Outside `-m`, a comma makes a value a sweep that Hydra refuses with a 5-line message: one line instead."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for text, override in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if override.is_sweep_override():
            key = override.get_key_element()
            raise UserError(
                f"{text}: a comma makes this a sweep; for one value with a comma quote it "
                f"(\"{key}='{text.split('=', 1)[1]}'\"), to sweep add -m"
            )


def single_run(overrides: list[str]) -> list[str]:
    """A sweep's first point (`lr=1,2` -> `lr=1`); searches Optuna draws from (`interval(...)`) are dropped."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for text, override in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if not override.is_sweep_override():
            out.append(text)
        elif not override.is_interval_sweep():
            first = next(iter(override.sweep_string_iterator()), None)
            if first is not None:
                out.append(f"{override.get_key_element()}={first}")
    return out


def options(configs: Path, group: str) -> list[str]:
    folder = configs / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def key_paths(node, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    paths = []
    for k in node:
        path = f"{prefix}.{k}" if prefix else str(k)
        child = node._get_node(k)
        paths.append(path)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            paths += key_paths(child, path)
    return paths


def did_you_mean(key: str, known: list[str], script: str) -> str:
    """The closest known key: the same last word in the same group first (`method.lr` ->
    `method.optimizer.lr`), else the closest spelling; else where `script`'s keys are listed."""
    last, group = key.split(".")[-1], key.split(".")[0]
    same = [k for k in known if k.split(".")[-1] == last and k.split(".")[0] == group]
    close = same or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else f"; see python {script} --help or --cfg job for the keys"


def explain(error: Exception, overrides: list[str], compose: Callable, configs: Path, script: str) -> str:
    """One line for a composition error."""
    text = str(error)
    if m := re.search(r"Could not override '([^']+)'", text):
        key = m.group(1)
        given = next((o for o in overrides if o.lstrip("+~").split("=")[0] == key), key)
        groups = [o for o in overrides if "=" in o and "." not in o.split("=")[0]]
        try:
            known = key_paths(compose(groups))
        except Exception:
            known = []
        return f"{given}: no such key{did_you_mean(key, known, script)}"
    if m := re.search(r"Could not find '([^']+)/([^'/]+)'", text) or re.search(
        r"In '[^']+': Could not find '([^']+)/([^']+)'", text
    ):
        group, option = m.group(1).lstrip("/"), m.group(2)
        names = options(configs, group)
        close = difflib.get_close_matches(option, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{group}={option}: no such option; use one of {', '.join(names)}{hint}"
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if unreadable := unparsable(overrides):
        key, _, value = unreadable.partition("=")
        fix = ""
        if "/" in value or "=" in value:  # a path (a run folder's name holds `=` and `,`), or text: quoting fixes it
            fix = f"; quote a path or text with = , spaces, brackets or quotes: {shell_word(hydra_literal(key, value))}"
        return f"{unreadable}: Hydra cannot read this value ({first}){fix}"
    return f"the command line: {first}"


def unparsable(overrides: list[str]) -> str | None:
    """The first `key=value` override Hydra's grammar cannot parse, if any."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in overrides:
        try:
            parser.parse_override(text)
        except Exception:
            if "=" in text:
                return text
    return None


def check(configs: Path, config_name: str, argv: list[str], script: str = "train.py") -> None:
    """Compose the command line's config once; a mistake becomes a UserError with one line (naming `script`,
    the entry script the user ran, where it points to the keys)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = overrides_of(argv)
    if overrides is None:
        return

    def composed(chosen: list[str]):
        with initialize_config_dir(version_base="1.3", config_dir=str(configs)):
            return compose(config_name, overrides=chosen)

    try:
        if "-m" not in argv and "--multirun" not in argv:
            unintended_sweeps(overrides)
        composed(single_run(overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise UserError(explain(e, overrides, composed, configs, script)) from None


def entry(task: Callable[[], object], script: str, config_name: str, argv: list[str] | None = None) -> None:
    """Run a Hydra task function (`script` is the entry script's `__file__`; its `configs/` folder) after
    checking its command line; `--help` prints lit_ti's help."""
    if argv is None:
        argv = sys.argv[1:] = quote_literals(sys.argv[1:])  # Hydra reads sys.argv itself
    else:
        argv = quote_literals(argv)
    configs = Path(script).resolve().parent / "configs"
    if any(a in ("--help", "-h") for a in argv):
        from lit_ti.cli_help import help_text

        print(help_text(configs, config_name, Path(script).name))
        return
    try:
        check(configs, config_name, argv, Path(script).name)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    task()
