"""Every setting of a run, where it is declared, documented and validated.

A run's configuration is built in three layers, later ones winning:

    defaults (the dataclasses of schema.py)  <  a YAML file (--config FILE)  <  overrides `section.key=value`

Every field carries a one-line comment (what it does, its unit); `python -m lstm_dist.config
--reference` prints them as the Markdown table in docs/configuration.md, and a test keeps the two in step.
Validation is strict: an unknown key, a wrong type or a value out of range fails at start-up with
one line naming the key, the reason and, for an unknown key, the closest valid names.

    python -m lstm_dist.config --config configs/smoke.yaml train.steps=50 --print-config

The package, by job (this module only gathers their public names; import them from here):

- `schema.py`: the sections (dataclasses) with each setting's type, allowed values, default and
  documentation, and `RULES`, each setting's range: the one place a setting's rule is written;
- `checks.py`: types and ranges applied (`validate`, `check_consistent`), and for code that takes a
  setting's value directly, `choices`, `check_setting`, `check_option`;
- `loading.py`: YAML, overrides, `load`, `from_dict`, `changes`, `add_arguments` and `parse_args` (the
  command line's `--config FILE` and overrides, a `--section.key value` refused with the spelling to use);
- `reference.py`: docs/configuration.md's table of every setting; `__main__.py`: the command line.

It imports nothing of the rest of lstm_dist but `lstm_dist.common.errors`, so every layer may read it.
"""

from lstm_dist.config.checks import check_consistent, check_option, check_setting, choices, coerce, validate
from lstm_dist.config.loading import (SETTINGS_HELP, add_arguments, changes, dashed_setting, from_dict, load,
                                      load_yaml, parse_args, parse_override, unknown_key)
from lstm_dist.config.schema import (RULES, CheckpointConfig, Config, DataConfig, LogConfig, ModelConfig,
                                     RunConfig, TrainConfig, WandbConfig, all_keys, is_section, leaf_fields,
                                     section_fields, set_value, value_at)

__all__ = [
    "CheckpointConfig", "Config", "DataConfig", "LogConfig", "ModelConfig", "RULES", "RunConfig", "SETTINGS_HELP",
    "TrainConfig", "WandbConfig", "add_arguments", "all_keys", "changes", "check_consistent", "check_option",
    "check_setting", "choices", "coerce", "dashed_setting", "from_dict", "is_section", "leaf_fields", "load",
    "load_yaml", "parse_args", "parse_override",
    "section_fields", "set_value", "unknown_key", "validate", "value_at",
]
