"""``--config cfg.yaml|cfg.json``: any command-line option of a command, read from a file.

Keys are option names with dashes or underscores (``flops_target: 0.5``, ``round-to: 8``,
``ignore: [head, "layer4.*"]``, ``global: true``, ``model: timm:resnet18``).  Options given on the
command line win over the file; ``ratio`` and ``flops_target`` count as one choice (the target), so
``--ratio`` on the command line replaces a ``flops_target`` from the file.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import USAGE, CLIError

TARGET_KEYS = ("ratio", "flops_target", "params_target", "latency_target")
NOT_IN_CONFIG = {"config", "help", "debug"}


def read_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--config: no such file {path!r}")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise CLIError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or write the "
                           "config as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise CLIError(f"--config {path}: not valid YAML: {e}") from None
    elif p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise CLIError(f"--config {path}: not valid JSON: {e}") from None
    else:
        raise CLIError(f"--config {path}: use a .yaml, .yml or .json file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """{key as written in a config file (underscores): action} for every option a config may set."""
    out = {}
    for a in parser._actions:  # argparse keeps no public list of a parser's actions
        if a.dest in NOT_IN_CONFIG or a.dest == argparse.SUPPRESS:
            continue
        longs = [s for s in a.option_strings if s.startswith("--")]
        name = longs[0][2:] if longs else a.dest
        out[name.replace("-", "_")] = a
    return out


def given_on_command_line(parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace) -> set[str]:
    """Dests of the options that ``argv`` sets explicitly (the parser must have ``allow_abbrev=False``)."""
    given = set()
    for a in parser._actions:
        if a.option_strings:
            if any(t == s or t.startswith(s + "=") for t in argv for s in a.option_strings):
                given.add(a.dest)
        elif getattr(args, a.dest, None) is not None:
            given.add(a.dest)
    return given


def _coerce(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    where = f"config key {key!r} in {path}"

    def bad(expected: str) -> CLIError:
        return CLIError(f"{where}: expected {expected}, got {value!r}", USAGE)

    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if action.nargs in ("+", "*"):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise bad("a name or a list of names")
        return list(items)
    if action.type in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad("a number" if action.type is float else "an integer")
        try:
            v = action.type(value)
        except ValueError:
            raise bad("a number" if action.type is float else "an integer") from None
        if action.type is int and isinstance(value, float) and value != v:
            raise bad("an integer")
        return v
    if action.type is not None and action.type is not str:  # a parser of its own (e.g. --round-to N|auto)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad("a number or a name")
        try:
            return action.type(value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise CLIError(f"{where}: {e}", USAGE) from None
    if key == "input_shape" and isinstance(value, list):
        return ",".join(str(v) for v in value)
    if not isinstance(value, str):
        raise bad("a string")
    if action.choices is not None and value not in action.choices:
        raise CLIError(f"{where}: must be one of {', '.join(map(str, action.choices))}, got {value!r}", USAGE)
    return value


def apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str],
                 path: str) -> dict[str, str]:
    """Fill ``args`` from the config file at ``path`` where the command line did not set an option.

    Returns {dest: the config key it came from} for the values taken from the file.
    """
    cfg = read_config(path)
    opts = _options(parser)
    given = given_on_command_line(parser, argv, args)
    norm = {}
    for key, value in cfg.items():
        k = str(key).replace("-", "_")
        if k not in opts:
            raise CLIError(f"--config {path}: unknown key {key!r}; valid keys: {', '.join(sorted(opts))}", USAGE)
        if k in norm:
            raise CLIError(f"--config {path}: key {key!r} is given twice (with dashes and underscores)", USAGE)
        norm[k] = value
    targets_in_file = [k for k in TARGET_KEYS if norm.get(k) is not None and k in opts]
    cli_target = any(opts[k].dest in given for k in TARGET_KEYS if k in opts)
    if len(targets_in_file) > 1 and not cli_target:
        raise CLIError(f"--config {path}: give either {' or '.join(repr(k) for k in targets_in_file)}, not "
                       f"{'both' if len(targets_in_file) == 2 else 'several'}", USAGE)
    sources = {}
    for k, value in norm.items():
        action = opts[k]
        if action.dest in given or (k in TARGET_KEYS and cli_target):
            continue
        if value is None:
            continue
        setattr(args, action.dest, _coerce(action, k, value, path))
        sources[action.dest] = k
    return sources
