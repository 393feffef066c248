"""Whether values are valid settings, each check written once and read from `schema.py`.

- `coerce`: a value against its field's type (and for text from the command line, parsed to it);
- `validate`: every field of a config, its type then its range rule (`schema.RULES`);
- `check_consistent`: settings valid one by one that contradict each other;
- for code that takes a setting's value directly instead of a config: `choices(key)` (the allowed
  values of a `Literal` setting), `check_setting(key, value)` (type and range, the message naming the
  key) and `check_option(key, value, option)` (the range, the message naming a command-line option
  that means the setting).

Every failure is a one-line `UserError` naming the key (or option), the reason and the value.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args, get_origin

from lstm_dist.common.errors import UserError
from lstm_dist.config.schema import RULES, Config, leaf_fields, value_at


def coerce(key: str, tp: Any, value: Any, source: str) -> Any:
    """`value` checked (and for strings from the command line, parsed) against a field's type `tp`:
    the value as the field holds it. `source` says where it came from in the message (a file name,
    `the command line`). Raises UserError for a value of another type or outside a `Literal`'s values,
    TypeError for a field type this module does not know (a bug in `schema.py`, not user input)."""
    where = f"{key} (from {source})"
    if get_origin(tp) is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise UserError(f"{where}: {value!r} is not one of " + ", ".join(repr(c) for c in allowed))
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, str):
            try:
                value = int(value.replace("_", ""))
            except ValueError:
                raise UserError(f"{where}: expected an integer, got {value!r}") from None
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        try:
            value = float(value)
        except ValueError:
            raise UserError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(value):
            raise UserError(f"{where}: expected a finite number, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise UserError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def validate(cfg: Config) -> Config:
    """`cfg` itself once every field has its type and is in its range; else UserError naming the
    first field that is not (types first, for configs built in code; then `RULES` in order)."""
    for key, tp in leaf_fields().items():
        coerce(key, tp, value_at(cfg, key), "the config")
    for key, (ok, what) in RULES.items():
        value = value_at(cfg, key)
        if not ok(value):
            raise UserError(f"{key} must be {what}, got {value!r}")
    return cfg


def choices(key: str) -> tuple[Any, ...]:
    """The allowed values of a setting whose type is a Literal (`choices("train.device")` ->
    ("auto", "cpu", "cuda")): consumers (command-line options, builders) read them here, never a copy.
    Raises KeyError for an unknown key, TypeError for a setting that is not a choice."""
    tp = leaf_fields()[key]
    if get_origin(tp) is not Literal:
        raise TypeError(f"{key} is not a choice setting")
    return get_args(tp)


def check_setting(key: str, value: Any, source: str = "the code") -> Any:
    """`value` checked as setting `key` would be on load (type, then range rule): the value (parsed where
    it came as text), or a UserError naming the key. For code that takes a setting's value directly
    (`CharLSTM(hidden=...)`), so that the rule is written once, in `schema.RULES`."""
    value = coerce(key, leaf_fields()[key], value, source)
    rule = RULES.get(key)
    if rule is not None and not rule[0](value):
        raise UserError(f"{key} must be {rule[1]}, got {value!r}")
    return value


def check_option(key: str, value: Any, option: str) -> Any:
    """`value` of the command-line option `option` (`--threads`), already parsed to its type, checked
    against the range rule of the setting `key` it stands for (`train.threads`): the value, or a
    UserError `{option} must be {what the rule says}, got {value}`. KeyError for a key without a rule."""
    ok, what = RULES[key]
    if not ok(value):
        raise UserError(f"{option} must be {what}, got {value}")
    return value


def check_consistent(cfg: Config) -> Config:
    """Settings valid one by one that contradict each other. Checked on `load` (a config a user is
    about to run), not on `from_dict`, so a checkpoint written before a check existed still loads."""
    t = cfg.train
    if t.warmup_steps > t.steps:
        raise UserError(f"train.warmup_steps={t.warmup_steps} is longer than the run (train.steps={t.steps}), so the "
                        "learning rate would never reach train.lr; set train.warmup_steps to at most train.steps")
    return cfg
