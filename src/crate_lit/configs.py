"""The command line of crate-train and crate-analyze, checked against the configs before Hydra runs.

Hydra reports an unknown group option or key as a multi-line error ("Could not override ...",
"To append to your config use +...", then a search-path listing) and exits with 1. Each such
mistake here gets one line that names the closest valid option or key, and the user-error exit
code (2) that every other crate-lit user error has. ``usage`` is the ``--help`` page: the groups
and their options (without the ``_``-prefixed files that other configs build on) and examples.
"""

import difflib
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "CommandLineError",
    "check_command_line",
    "to_container",
    "group_options",
    "run_command",
    "usage",
    "user_overrides",
]

# Hydra's own flags that take a value (the rest are switches)
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--experimental-rerun"}
_CONFIG_DIR_FLAGS = {"--config-path", "-cp", "--config-dir", "-cd"}
_ABSENT = object()


class CommandLineError(ValueError):
    """A group option or key on the command line that the configs do not have."""


def config_root() -> Path:
    from .runs import config_dir

    return Path(config_dir())


def group_options(group: str, root: Optional[Path] = None) -> List[str]:
    """The options of a config group: its .yaml files, without the ``_``-prefixed bases."""
    folder = (root or config_root()) / group
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.name.startswith("_"))


def _groups(root: Path) -> List[str]:
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and p.name != "hydra" and group_options(p.name, root)
    )


def user_overrides(argv: Sequence[str]) -> Optional[List[str]]:
    """The overrides in a Hydra command line (its flags left out), or None when it reads configs
    from another folder (``--config-dir``), where crate-lit's configs say nothing."""
    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in _CONFIG_DIR_FLAGS:
            return None
        if arg.startswith("-"):
            skip = flag in _FLAGS_WITH_VALUE and "=" not in arg
            continue
        overrides.append(arg)
    return overrides


def _closest(word: str, options: Sequence[str]) -> Optional[str]:
    found = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return found[0] if found else None


def _values(override: Override) -> List[str]:
    """The option names an override asks for: one, or each of a choice sweep (a,b or choice(a,b))."""
    if override.is_sweep_override():
        try:
            return [str(v) for v in override.sweep_string_iterator()]
        except (HydraException, TypeError, ValueError):  # ranges, intervals: no option names
            return []
    value = override.value()
    return [] if value is None or isinstance(value, (dict, list)) else [str(value)]


def _check_group(override: Override, root: Path) -> None:
    group = override.key_or_group
    options = group_options(group, root)
    for value in _values(override):
        if value in options or value == "null":
            continue
        if value.startswith("_") and (root / group / f"{value}.yaml").exists():
            raise CommandLineError(
                f"{group}={value} is a base that the {group} configs build on, not an option; "
                f"choose one of {', '.join(options)}"
            )
        near = _closest(value, options)
        hint = f"did you mean {group}={near}? " if near else ""
        raise CommandLineError(f"unknown {group}={value}; {hint}choose one of {', '.join(options)}")


def _keys(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, child in node.items():
            yield f"{prefix}{key}"
            yield from _keys(child, f"{prefix}{key}.")


def _lookup(tree: Any, key: str) -> Any:
    """The value at a dotted key of an unresolved config tree (interpolations stay text: some,
    like ${hydra:...}, resolve only inside a Hydra run), or _ABSENT."""
    for part in key.split("."):
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return _ABSENT
    return tree


def _unknown_key(tree: Dict[str, Any], key: str, value: str) -> str:
    parent, _, leaf = key.rpartition(".")
    siblings = _lookup(tree, parent) if parent else tree
    near = None
    if isinstance(siblings, dict):
        near = _closest(leaf, [str(k) for k in siblings])
        near = f"{parent}.{near}" if near and parent else near
    every = list(_keys(tree))
    if near is None:  # the same name under another parent (model.lr -> optimizer.lr), or any close path
        same_leaf = [k for k in every if k.rpartition(".")[2] == leaf]
        near = same_leaf[0] if same_leaf else _closest(key, every)
    hint = f"did you mean {near}? " if near else ""
    return (
        f"unknown key {key} (not in the composed config); {hint}`--cfg job` prints every key, and "
        f"+{key}={value} adds a new one"
    )


def check_command_line(config_name: str, argv: Sequence[str]) -> None:
    """Raise ``CommandLineError`` (one line) for an unknown group option or key in ``argv``.

    Other problems (a value of the wrong type, a missing required value) are left to the
    program's own checks, which report them once the config is composed."""
    overrides = user_overrides(argv)
    if not overrides:
        return
    root = config_root()
    parser, parsed = OverridesParser.create(), []
    for text in overrides:
        try:
            parsed += parser.parse_overrides([text])
        except HydraException:  # e.g. a non-ASCII character, brackets or "=" in an unquoted path
            key, _, value = text.partition("=")
            raise CommandLineError(
                f"Hydra cannot read the override {text!r} unquoted; quote its value: {key}='{value}' "
                f"(in a shell, the whole override too: \"{key}='{value}'\")"
            ) from None
    parsed = [o for o in parsed if not o.key_or_group.startswith("hydra")]
    groups = [o for o in parsed if o.type != OverrideType.DEL and (root / o.key_or_group).is_dir()]
    for override in groups:
        _check_group(override, root)
    # compose with the groups chosen (the first option of a sweep) and the keys added with +,
    # then every key that is set must exist there
    chosen = []
    for override in parsed:
        values = _values(override)
        if override.type == OverrideType.DEL or not values:
            continue
        if override in groups or override.type in (OverrideType.ADD, OverrideType.FORCE_ADD):
            prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++"}.get(override.type, "")
            chosen.append(f"{prefix}{override.key_or_group}={values[0]}")
    try:
        with initialize_config_dir(config_dir=str(root), version_base="1.3"):
            cfg = compose(config_name, overrides=chosen)
    except (HydraException, OmegaConfBaseException):  # Hydra reports it when it composes
        return
    tree = OmegaConf.to_container(cfg, resolve=False)
    for override in parsed:
        if override.type != OverrideType.CHANGE or override in groups:
            continue
        key = override.key_or_group
        if _lookup(tree, key) is _ABSENT:
            raise CommandLineError(_unknown_key(tree, key, override.get_value_element_as_str()))


def usage(program: str, config_name: str, about: str, examples: Sequence[str]) -> str:
    """The ``--help`` page: what the program does, its groups with their options, examples."""
    root = config_root()
    defaults: Dict[str, Any] = {}
    for entry in yaml.safe_load((root / f"{config_name}.yaml").read_text()).get("defaults", []):
        if isinstance(entry, dict):
            defaults.update({str(k).split(" ")[-1]: v for k, v in entry.items()})
    lines = [
        f"usage: {program} [group=option ...] [key=value ...] [-m] [--cfg job] [--hydra-help]",
        "",
        about,
        "",
        "config groups (group=option; * marks the default; a group without one is unset unless chosen):",
    ]
    for group in _groups(root):
        if group not in defaults:
            continue
        marked = [f"{o}*" if o == defaults[group] else o for o in group_options(group, root)]
        text = textwrap.wrap(", ".join(marked), width=80)
        lines += [f"  {group if i == 0 else '':<15}{part}" for i, part in enumerate(text)]
    lines += [
        "",
        "keys: any value of the composed config, e.g. trainer.max_epochs=20 data.batch_size=128;",
        f"  `{program} --cfg job` prints the composed config, +key=value adds a key it does not have.",
        "  -m (--multirun) sweeps comma-separated values: optimizer=lion,adamw optimizer.lr=1e-4,2e-4",
        "",
        "examples:",
        *(f"  {line}" for line in examples),
        "",
        "Hydra's own options: --hydra-help. Documentation: README.md.",
    ]
    return "\n".join(lines)


def run_command(
    program: str, config_name: str, about: str, examples: Sequence[str], hydra_main: Callable[[], Any]
) -> None:
    """An entry point's command line: ``--help`` prints ``usage``; a mistyped group option or key
    is one line and exit code 2; anything else goes on to ``hydra_main`` (a ``@hydra.main``)."""
    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        print(usage(program, config_name, about, examples))
        return
    try:
        check_command_line(config_name, argv)
    except CommandLineError as err:
        print(f"{program}: error: {err}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


def to_container(cfg: Optional[Any]) -> Dict[str, Any]:
    """An OmegaConf node (or mapping) as a plain dict with interpolations resolved."""
    if cfg is None:
        return {}
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)
