"""Every setting of a run, where it is declared, documented and validated.

A run's configuration is built in three layers, later ones winning:

    defaults (the dataclasses below)  <  a YAML file (--config FILE)  <  overrides `section.key=value`

Every field carries a one-line comment (what it does, its unit); `python -m lstm_dist.config
--reference` prints them as the Markdown table in README.md, and a test keeps the two in step.
Validation is strict: an unknown key, a wrong type or a value out of range fails at start-up with
one line naming the key, the reason and, for an unknown key, the closest valid names.

    python -m lstm_dist.config --config configs/smoke.yaml train.steps=50 --print-config
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from lstm_dist.common.errors import UserError

# --------------------------------------------------------------------------------------------
# The settings. A field's comment (the `#:` line above it) is its documentation: keep one each.
# --------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    #: name of the run; its directory is `run.dir/run.name`
    name: str = "smoke"
    #: parent directory of run directories
    dir: str = "runs"
    #: base random seed: model init uses `seed` on every rank, then rank r's generators (dropout) `seed + 1000·r + 1`; text samples `seed + step` (seeds.py lists them all)
    seed: int = 1234


@dataclass
class DataConfig:
    #: prepared corpus directory (train.bin, valid.bin, test.bin, vocab.json, meta.json); a missing built-in source's default location (data/stdlib-docs) is prepared on first use
    path: str = "data/stdlib-docs"
    #: vocabulary used when this run prepares the corpus itself: `bytes` (256 UTF-8 byte values) or `chars` (characters of the training split)
    vocab: Literal["bytes", "chars"] = "bytes"
    #: start each epoch after the first at a seeded random offset in [0, bptt), the same on every rank
    random_offset: bool = True


@dataclass
class ModelConfig:
    #: width of the character embedding (input size of the first LSTM layer)
    embedding: int = 128
    #: LSTM hidden units per layer
    hidden: int = 512
    #: number of stacked LSTM layers
    layers: int = 1
    #: dropout probability between LSTM layers and before the output head, in [0, 1)
    dropout: float = 0.0
    #: LSTM implementation: `fast` (hand-written backward) or `reference` (step-by-step autograd)
    impl: Literal["fast", "reference"] = "fast"
    #: on CUDA, fuse each time step's pointwise gate math into one kernel with torch.compile (the CPU runs its eager ops, measured faster there); if any rank cannot compile, every rank runs eager and the log says which
    compile: bool = True


@dataclass
class TrainConfig:
    #: character streams per rank (the global batch is world_size × batch_size streams)
    batch_size: int = 32
    #: characters per truncated-BPTT window (time steps backpropagated through)
    bptt: int = 128
    #: optimizer steps in the whole run (one step = one window on every rank)
    steps: int = 1000
    #: peak learning rate of one LSTM layer `lr_ref_hidden` units wide at a global batch of `lr_ref_batch` streams, reached after warm-up; `lr_scaling` gives other shapes theirs
    lr: float = 2e-2
    #: `rule`: peak = lr × (global / lr_ref_batch)^lr_batch_exponent × (lr_ref_hidden / hidden)^lr_width_exponent / layers^lr_depth_exponent (lstm_dist/lr_rule.py; global = world_size × batch_size streams); `none`: lr as written
    lr_scaling: Literal["rule", "none"] = "rule"
    #: global batch (streams) at which `lr` is the peak rate as written
    lr_ref_batch: int = 32
    #: how the peak rate follows the global batch: 0.5 is the square-root rule, 0 none (measured: 0, see docs/lr_sweep.md)
    lr_batch_exponent: float = 0.0
    #: model.hidden at which `lr` is the peak rate as written
    lr_ref_hidden: int = 256
    #: how the peak rate falls with the width: 1 is inverse to model.hidden, 0.5 its square root (measured: 0.5, see docs/lr_sweep.md)
    lr_width_exponent: float = 0.5
    #: how the peak rate falls with the depth: the rate is divided by model.layers to this power (measured: 1)
    lr_depth_exponent: float = 1.0
    #: final learning rate at the end of the decay, as a fraction of the peak (`lr` after the rule)
    min_lr_ratio: float = 0.1
    #: steps of linear learning-rate warm-up from 0
    warmup_steps: int = 0
    #: decay after warm-up: `cosine`, `linear` or `constant`
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    #: optimizer: `adamw` or `sgd` (with momentum)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    #: decoupled weight decay (AdamW) or L2 (SGD); applied to matrices only, not biases or the embedding
    weight_decay: float = 0.01
    #: AdamW beta1 (0: no momentum, which trained every measured shape better than 0.9: docs/lr_sweep.md), or SGD momentum (with optimizer=sgd set it, e.g. 0.9)
    beta1: float = 0.0
    #: AdamW beta2
    beta2: float = 0.99
    #: clip the global gradient norm (after the all-reduce) to this; 0 turns clipping off
    clip_norm: float = 1.0
    #: run a validation pass every this many steps; 0 only at the end
    eval_every: int = 200
    #: cap on validation windows per evaluation during training, per rank; 0 evaluates the whole split (the final evaluation always does)
    eval_max_windows: int = 0
    #: stop the run after this many consecutive failed steps (a non-finite loss or gradient, or a diverged loss: `divergence_ratio`); each one is skipped on every rank
    max_nonfinite: int = 5
    #: a step whose mean loss is above this × ln(vocabulary size), the loss of a uniform guess, has diverged: it fails like a non-finite one, and a final score above it (in bits: × log2 of the size) ends the run with exit 3, not `done`; 0 turns both checks off
    divergence_ratio: float = 3.0
    #: when a resumed run's settings change its learning-rate schedule (train.steps, lr, warm-up, decay, the rule's inputs): `continue` goes on from the rate in force at the resume step along the new schedule to its new end, with no jump; `recompute` uses the new schedule as if the run had always had it
    resume_schedule: Literal["continue", "recompute"] = "continue"
    #: seconds a collective waits for the slowest rank before the job fails with an error (the process-group timeout): a rank that hangs or died stops the others after this long
    collective_timeout: float = 600.0
    #: arithmetic: `fp32`, `bf16` (autocast on CUDA; state and cell update stay fp32), or `auto` (bf16 on CUDA, fp32 on CPU)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: device: `auto` (CUDA when available, one GPU per local rank), `cpu` or `cuda`
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: torch intra-op threads per process on the CPU; 0 divides the cores among the local processes
    threads: int = 0
    #: characters of generated text logged at each evaluation; 0 turns samples off
    sample_chars: int = 200


@dataclass
class WandbConfig:
    #: Weights & Biases: `auto` (follows WANDB_MODE when set, else online when an API key is configured, else offline), `online`, `offline`, `disabled`; an explicit mode wins over WANDB_MODE, said in one line
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    #: W&B project name
    project: str = "lstm_dist"
    #: W&B entity (user or team); empty uses the account's default
    entity: str = ""
    #: seconds to wait for an online W&B start before falling back to offline
    init_timeout: float = 30.0


@dataclass
class LogConfig:
    #: log a metrics line every this many steps
    every: int = 10
    #: Weights & Biases settings (rank 0 only)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    #: write a checkpoint every this many steps; 0 only at the end and on preemption
    every: int = 500
    #: keep this many most recent checkpoints (older ones are deleted after a new one is written)
    keep: int = 3
    #: `auto` (latest valid checkpoint of the run directory, else start fresh), `never`, or a checkpoint file path
    resume: str = "auto"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


# Range checks: key -> (predicate, what the value must be). Applied after every load.
_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "run.name": (lambda v: bool(v) and "/" not in v and v not in (".", ".."), "a non-empty name without '/'"),
    "run.dir": (lambda v: bool(v), "a non-empty path"),
    "run.seed": (lambda v: v >= 0, ">= 0"),
    "data.path": (lambda v: bool(v), "a non-empty path"),
    "model.embedding": (lambda v: v > 0, "> 0"),
    "model.hidden": (lambda v: v > 0, "> 0"),
    "model.layers": (lambda v: v > 0, "> 0"),
    "model.dropout": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "train.batch_size": (lambda v: v > 0, "> 0"),
    "train.bptt": (lambda v: v > 0, "> 0"),
    "train.steps": (lambda v: v > 0, "> 0"),
    "train.lr": (lambda v: v > 0, "> 0"),
    "train.lr_ref_batch": (lambda v: v > 0, "> 0 streams"),
    "train.lr_ref_hidden": (lambda v: v > 0, "> 0 units"),
    "train.lr_batch_exponent": (lambda v: 0.0 <= v <= 1.0, "in [0, 1] (0.5 is the square-root rule)"),
    "train.lr_width_exponent": (lambda v: 0.0 <= v <= 2.0, "in [0, 2] (1 is inverse to the width)"),
    "train.lr_depth_exponent": (lambda v: 0.0 <= v <= 3.0, "in [0, 3]"),
    "train.min_lr_ratio": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "train.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "train.weight_decay": (lambda v: v >= 0, ">= 0"),
    "train.beta1": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "train.beta2": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "train.clip_norm": (lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
    "train.eval_every": (lambda v: v >= 0, ">= 0 (0 evaluates only at the end)"),
    "train.eval_max_windows": (lambda v: v >= 0, ">= 0 (0 evaluates the whole split)"),
    "train.max_nonfinite": (lambda v: v > 0, "> 0"),
    "train.divergence_ratio": (lambda v: v == 0 or v > 1, "0 (off) or > 1 (a uniform guess scores 1)"),
    "train.threads": (lambda v: v >= 0, ">= 0 (0 divides the cores among local processes)"),
    "train.sample_chars": (lambda v: v >= 0, ">= 0"),
    "log.every": (lambda v: v > 0, "> 0"),
    "log.wandb.init_timeout": (lambda v: v > 0, "> 0 seconds"),
    "train.collective_timeout": (lambda v: v > 0, "> 0 seconds"),
    "checkpoint.every": (lambda v: v >= 0, ">= 0 (0 writes only at the end and on preemption)"),
    "checkpoint.keep": (lambda v: v > 0, "> 0"),
    "checkpoint.resume": (lambda v: bool(v), "'auto', 'never' or a checkpoint path"),
}


# --------------------------------------------------------------------------------------------
# Introspection: the fields of every section, their types and their comments.
# --------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def leaf_fields(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> type, for every setting (`train.bptt` -> int, `log.wandb.mode` -> Literal[...])."""
    out: dict[str, Any] = {}
    for name, tp in _hints(cls).items():
        key = f"{prefix}{name}"
        if _is_section(tp):
            out.update(leaf_fields(tp, key + "."))
        else:
            out[key] = tp
    return out


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every valid dotted key, sections included (`log`, `log.wandb`, `log.wandb.mode`)."""
    keys = []
    for name, tp in _hints(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        if _is_section(tp):
            keys.extend(_all_keys(tp, key + "."))
    return keys


# --------------------------------------------------------------------------------------------
# Loading, overriding, validating.
# --------------------------------------------------------------------------------------------


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set(cfg: Any, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    setattr(cfg, last, value)


def _unknown(key: str) -> UserError:
    valid = _all_keys()
    close = difflib.get_close_matches(key, valid, n=2, cutoff=0.75)
    if not close:  # also try the last part alone, for keys put in the wrong section
        last = key.rsplit(".", 1)[-1]
        close = [k for k in leaf_fields() if k.rsplit(".", 1)[-1] == last][:3]
    hint = "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?" if close else (
        "; valid sections are " + ", ".join(f"'{s}'" for s in _hints(Config)))
    return UserError(f"unknown key '{key}'{hint}")


def _coerce(key: str, tp: Any, value: Any, source: str) -> Any:
    """Check (and for strings from the command line, parse) a value against a field's type."""
    where = f"{key} (from {source})"
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise UserError(f"{where}: {value!r} is not one of " + ", ".join(repr(c) for c in choices))
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
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this file, not user input


def _apply_mapping(cfg: Config, data: Any, source: str, prefix: str = "", cls: type = Config) -> None:
    if not isinstance(data, dict):
        what = f"section '{prefix[:-1]}'" if prefix else "the top level"
        raise UserError(f"{source}: {what} must be a mapping of keys to values, got {type(data).__name__}")
    hints = _hints(cls)
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise _unknown(key)
        tp = hints[name]
        if _is_section(tp):
            if value is None:
                continue
            _apply_mapping(cfg, value, source, key + ".", tp)
        else:
            _set(cfg, key, _coerce(key, tp, value, source))


def validate(cfg: Config) -> Config:
    for key, tp in leaf_fields().items():
        value = _get(cfg, key)
        _coerce(key, tp, value, "the config")  # types, for configs built in code
    for key, (ok, what) in _RULES.items():
        value = _get(cfg, key)
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
    (`CharLSTM(hidden=...)`), so that the rule is written once, here."""
    value = _coerce(key, leaf_fields()[key], value, source)
    rule = _RULES.get(key)
    if rule is not None and not rule[0](value):
        raise UserError(f"{key} must be {rule[1]}, got {value!r}")
    return value


def check_consistent(cfg: Config) -> Config:
    """Settings valid one by one that contradict each other. Checked on `load` (a config a user is
    about to run), not on `from_dict`, so a checkpoint written before a check existed still loads."""
    t = cfg.train
    if t.warmup_steps > t.steps:
        raise UserError(f"train.warmup_steps={t.warmup_steps} is longer than the run (train.steps={t.steps}), so the "
                        "learning rate would never reach train.lr; set train.warmup_steps to at most train.steps")
    return cfg


def from_dict(data: dict[str, Any], source: str = "a dict") -> Config:
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
        now = _get(cfg, key)
        if node is not _MISSING and node != now:
            found.append((key, node, now))
    return found


def load_yaml(path: str | Path) -> dict[str, Any]:
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
    """Defaults, then the YAML file, then `section.key=value` overrides; validated."""
    cfg = Config()
    if path is not None:
        _apply_mapping(cfg, load_yaml(path), str(path))
    leaves = leaf_fields()
    for text in overrides:
        key, value = parse_override(text)
        if key not in leaves:
            if key in _all_keys():
                raise UserError(f"'{key}' is a section, not a setting; override one of its keys, e.g. {key}.{next(k.split('.')[-1] for k in leaves if k.startswith(key + '.'))}=...")
            raise _unknown(key)
        tp = leaves[key]
        if tp is str or get_origin(tp) is Literal:
            value = text.split("=", 1)[1]  # strings are taken verbatim ('0123', 'on' stay as typed)
        _set(cfg, key, _coerce(key, tp, value, "the command line"))
    return check_consistent(validate(cfg))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The config options every entry point shares."""
    parser.add_argument("--config", metavar="FILE", help="YAML file with settings (see configs/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="settings that win over the file")
