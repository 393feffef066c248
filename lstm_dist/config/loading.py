"""Building a run's config: defaults, then a YAML file, then `section.key=value` overrides, validated.

`load` is what an entry point calls with `--config FILE` and the overrides (`add_arguments` declares
both, `parse_args` reads them and refuses torchtitan's `--section.key value` with the one spelling,
`section.key=value`); `from_dict` rebuilds the config saved inside a checkpoint; `changes` lists what a resumed run
changed against it. An unknown key fails in one line naming the closest valid keys.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import typing
from pathlib import Path
from typing import Any, Literal, get_origin

import yaml

from lstm_dist.common.errors import UserError
from lstm_dist.config.checks import check_consistent, coerce, validate
from lstm_dist.config.schema import Config, all_keys, is_section, leaf_fields, section_fields, set_value, value_at


def _closest_keys(key: str) -> list[str]:
    """The valid keys closest to the unknown `key` (at most 3; [] where none is close)."""
    close = difflib.get_close_matches(key, all_keys(), n=2, cutoff=0.75)
    if not close:  # also try the last part alone, for keys put in the wrong section
        last = key.rsplit(".", 1)[-1]
        close = [k for k in leaf_fields() if k.rsplit(".", 1)[-1] == last][:3]
    return close


def _sections_hint() -> str:
    return "valid sections are " + ", ".join(f"'{s}'" for s in section_fields(Config))


def unknown_key(key: str) -> UserError:
    """The error for a key no section has, with the closest valid keys (or the sections) as the fix."""
    close = _closest_keys(key)
    hint = "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?" if close else "; " + _sections_hint()
    return UserError(f"unknown key '{key}'{hint}")


def _apply_mapping(cfg: Config, data: Any, source: str, prefix: str = "", cls: type = Config) -> None:
    if not isinstance(data, dict):
        what = f"section '{prefix[:-1]}'" if prefix else "the top level"
        raise UserError(f"{source}: {what} must be a mapping of keys to values, got {type(data).__name__}")
    hints = section_fields(cls)
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise unknown_key(key)
        tp = hints[name]
        if is_section(tp):
            if value is None:
                continue
            _apply_mapping(cfg, value, source, key + ".", tp)
        else:
            set_value(cfg, key, coerce(key, tp, value, source))


def from_dict(data: dict[str, Any], source: str = "a dict") -> Config:
    """The config a nested dict (`Config.to_dict()`, a checkpoint's) describes, over the defaults;
    validated one setting at a time (not `check_consistent`). `source` names it in errors."""
    cfg = Config()
    _apply_mapping(cfg, data, source)
    return validate(cfg)


_MISSING = object()  # a key a saved config lacks


def changes(saved: dict[str, Any], cfg: Config, ignore: typing.Collection[str] = ("checkpoint.resume",)) -> list[tuple[str, Any, Any]]:
    """Every setting whose value in `cfg` differs from the config dict `saved` (a checkpoint's), as
    (dotted key, saved value, value now), in the order of the reference. Keys that `saved` lacks (a
    checkpoint written before the setting existed) and `ignore` are left out."""
    found = []
    for key in leaf_fields():
        if key in ignore:
            continue
        node: Any = saved
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        now = value_at(cfg, key)
        if node is not _MISSING and node != now:
            found.append((key, node, now))
    return found


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in YAML file `path` ({} for an empty file); UserError for a missing file or bad YAML
    (with the line and column)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} not found; pass an existing YAML file (see configs/)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UserError(f"config file {p} is not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    return data or {}


def parse_override(text: str) -> tuple[str, Any]:
    """(key, value) of one `section.key=value` override, the value typed by YAML's scalar rules;
    UserError for text without `key=`."""
    if "=" not in text or text.startswith("="):
        raise UserError(f"override {text!r} must look like section.key=value (for example train.steps=200)")
    key, raw = text.split("=", 1)
    key = key.strip()
    # Values come in as text; YAML's scalar rules give numbers, booleans and strings their types.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, raw if isinstance(value, (dict, list)) or value is None else value


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file, then `section.key=value` overrides; validated and checked for
    consistency. Raises UserError naming the key for anything wrong."""
    cfg = Config()
    if path is not None:
        _apply_mapping(cfg, load_yaml(path), str(path))
    leaves = leaf_fields()
    for text in overrides:
        key, value = parse_override(text)
        if key not in leaves:
            if key in all_keys():
                raise UserError(f"'{key}' is a section, not a setting; override one of its keys, e.g. {key}.{next(k.split('.')[-1] for k in leaves if k.startswith(key + '.'))}=...")
            raise unknown_key(key)
        tp = leaves[key]
        if tp is str or get_origin(tp) is Literal:
            value = text.split("=", 1)[1]  # strings are taken verbatim ('0123', 'on' stay as typed)
        set_value(cfg, key, coerce(key, tp, value, "the command line"))
    return check_consistent(validate(cfg))


# Where a user finds every setting; the --help of each entry point that takes settings ends with it.
SETTINGS_HELP = """\
settings: --config FILE (configs/*.yaml), then section.key=value overrides, later ones winning, e.g.
  train.steps=50 model.hidden=1024   (no dashes: --train.steps 50 is refused with the spelling to use)
every key, with its type, default and meaning: docs/configuration.md
  (or: python -m lstm_dist.config --reference)"""


def add_arguments(parser: argparse.ArgumentParser, print_config: bool = True) -> None:
    """The config options every entry point that takes settings shares: `--config FILE`, `--print-config`
    (unless `print_config` is False) and the `section.key=value` overrides (`args.overrides`, a list of
    str); `SETTINGS_HELP` goes before the parser's epilog, which is then printed as written (line breaks
    kept). Parse with `parse_args` below."""
    parser.add_argument("--config", metavar="FILE", help="YAML file with settings (see configs/)")
    if print_config:
        parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="settings that win over the file, e.g. train.steps=50 (every key: see below)")
    parser.epilog = SETTINGS_HELP + (f"\n\n{parser.epilog}" if parser.epilog else "")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def dashed_setting(argv: typing.Sequence[str]) -> UserError | None:
    """The error for the first setting in `argv` written as an option, torchtitan's `--section.key value`
    or `--section.key=value` (any `--NAME` whose NAME holds a dot), else None. Settings are written one
    way only, `section.key=value`; the line gives that spelling (with `_` for a `-` in the key), or for a
    key no section has, the closest valid keys, as `unknown_key` does."""
    leaves = leaf_fields()
    for i, token in enumerate(argv):
        if token == "--":
            break
        name, eq, value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        if "." not in name:
            continue
        written = token
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("--") and "=" not in nxt:
                value, written = nxt, f"{token} {nxt}"
            else:
                value = "true" if leaves.get(name.replace("-", "_")) is bool else "VALUE"
        key = name.replace("-", "_")
        rule = "settings are written section.key=value, without dashes"
        if key in leaves:
            return UserError(f"{written} is written {key}={value} here: {rule}")
        close = [c for c in _closest_keys(key) if c in leaves]
        if close:
            return UserError(f"unknown key '{key}' in {written}; did you mean "
                             + " or ".join(f"{c}={value}" for c in close) + f"? ({rule})")
        return UserError(f"unknown key '{key}' in {written}; {_sections_hint()} ({rule})")
    return None


def parse_args(parser: argparse.ArgumentParser, argv: typing.Sequence[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)` (argv None: the command line) for a parser with `add_arguments`, after
    refusing a setting written as an option (`dashed_setting`) in one line: argparse alone would say only
    `unrecognized arguments`. Errors: UserError; argparse's own exit for anything else."""
    argv = list(sys.argv[1:] if argv is None else argv)
    error = dashed_setting(argv)
    if error is not None:
        raise error
    return parser.parse_args(argv)
