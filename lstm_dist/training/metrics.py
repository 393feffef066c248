"""One `log(step, values)` that feeds the console, `metrics.jsonl` and Weights & Biases.

Rank 0 builds a `Metrics`; every other rank logs to `NO_METRICS`, which does nothing. The training
loop only ever talks to one of these two. The names it logs are grouped as W&B groups its panels
(`train/loss`, `val/bpb`, `perf/chars_per_s`, ...: docs/metrics.md), the same in every sink.

Three sinks, in order of trust:

- console: one line per `log` call, written for a person: the caller's own (the training line,
  `loop.log_line`) or the values by `format_line`:
  ``step 160 | valid 2.1420 bpb over 70,914 bytes | eval 0.71s`` (the evaluation's own line);
- `JsonlSink`, ``run_dir/metrics.jsonl``: one JSON object per call (``step``, wall-clock ``time``
  in Unix seconds, then the values at full precision), flushed every call, appended across
  resumes. It is strict JSON (``json.dumps(allow_nan=False)``): a non-finite float (a diverged
  loss) is written as ``null``, which pandas/jq/DuckDB read as a missing number; the console and
  W&B keep the exact ``nan``/``inf``. This file is the record of truth: W&B failing never stops it;
- `WandbSink` (`wandb_sink.py`), rank 0 only, files under ``run_dir/wandb/``. W&B is optional equipment: any failure
  (no key, no network, a crash inside wandb) falls back to offline or switches W&B off with one
  warning line, and training carries on.

Modes (``log.wandb.mode``; `MODES` reads them from the config): ``auto``, ``online``, ``offline``,
``disabled``. ``auto`` leaves the choice to ``WANDB_MODE`` when it is set, else picks online when wandb
finds an API key and offline otherwise, saying so in one line. An explicit mode wins over ``WANDB_MODE``
(as ``wandb.init(mode=...)`` does in wandb), with one line saying so when the two differ; online without
an API key runs offline with one warning, and an online start that fails (no server) falls back to
offline under the same run id.

Resume: the W&B run id lives in ``run_dir/wandb_run_id``; a new `Metrics` on the same run dir
passes ``id=<that id>, resume="allow"`` so the run continues. After restoring a checkpoint at
step S the loop calls `truncate_after(S)` so the JSONL holds no rows from a crashed tail.
(W&B itself keeps such rows: it refuses steps lower than ones it already has, and says so.)
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, TextIO

from lstm_dist.common.atomic import atomic_write_text
from lstm_dist.common.errors import UserError
from lstm_dist.config import WandbConfig, choices
from lstm_dist.training.wandb_sink import WandbSink

MODES = choices("log.wandb.mode")  # the values of log.wandb.mode, as the config declares them
JSONL_NAME = "metrics.jsonl"
_RESERVED_KEYS = ("step", "time")


# ----------------------------------------------------------------------------- values


def _scalar(value: Any) -> Any:
    """Plain Python for a value: numpy scalars and 0-d tensors become int/float/bool."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            pass
    return value


def _json_safe(value: Any) -> Any:
    """Strict-JSON form: non-finite floats become null, unknown objects their str()."""
    value = _scalar(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


# ----------------------------------------------------------------------------- console


def format_value(value: Any) -> str:
    """Compact console form: ints as is, floats to 4 decimals, tiny/huge ones in e-notation."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude == 0:
        return "0"
    if magnitude < 1e-2 or magnitude >= 1e9:
        return f"{value:.2e}"
    if magnitude >= 1e4:
        return f"{value:.0f}"
    return f"{value:.4f}"


def format_rate(value: float) -> str:
    """47713.26 -> '47.7k', 18000 -> '18.0k', 1.25e6 -> '1.25M', 512 -> '512'."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            scaled = value / scale
            return (f"{scaled:.0f}" if abs(scaled) >= 100 else f"{scaled:#.3g}") + suffix
    return f"{value:.0f}"


def format_duration(seconds: float) -> str:
    """229.5 -> '3m49s', 5400 -> '1h30m', 0.25 -> '0.25s'."""
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds < 10:
        return f"{seconds:.2g}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_item(key: str, value: Any) -> str:
    """One field of a console line, by its unit: rates, durations, milliseconds, percentages."""
    value = _scalar(value)
    if not isinstance(value, float) or isinstance(value, bool) or not math.isfinite(value):
        return f"{key} {format_value(value)}"
    if key.endswith("_per_s"):
        return f"{format_rate(value)} {key[:-len('_per_s')]}/s"
    if key == "eta_s":
        return f"ETA {format_duration(value)}"
    if key.endswith("_s"):
        return f"{key[:-2]} {format_duration(value)}"
    if key.endswith("_ms"):
        return f"{key[:-3]} {value:.3g} ms"
    if key.endswith("_pct"):
        return f"{key[:-4]} {value:.1f}%"
    return f"{key} {format_value(value)}"


def format_line(step: int, values: Mapping[str, Any]) -> str:
    return " | ".join([f"step {step}"] + [format_item(k, v) for k, v in values.items()])


# ----------------------------------------------------------------------------- sinks


class JsonlSink:
    """``metrics.jsonl``: one strict-JSON row per call, flushed at once, appended across resumes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None
        self._open()

    def _open(self) -> None:
        # A crash can leave a last line without its newline; start ours on a fresh line.
        needs_newline = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        self._file = open(self.path, "a", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")

    def write(self, row: dict) -> None:
        assert self._file is not None
        self._file.write(json.dumps(_json_safe(row), allow_nan=False) + "\n")
        self._file.flush()

    def truncate_after(self, step: int) -> int:
        """Drop rows with ``step`` > `step` and torn lines; rewrite atomically; return how many went."""
        self.close()
        kept: list[str] = []
        dropped = 0
        for line in self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            row_step = row.get("step") if isinstance(row, dict) else None
            if isinstance(row_step, (int, float)) and row_step > step:
                dropped += 1
                continue
            kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._open()
        return dropped

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError:
                pass
            self._file.close()
            self._file = None


# ----------------------------------------------------------------------------- the object


class Metrics:
    """Console + metrics.jsonl + W&B for one run, on rank 0. The W&B keywords are the `log.wandb.*`
    settings (their defaults are the config's); a mode outside `MODES` is a UserError."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any], *, wandb_mode: str = WandbConfig.mode,
                 project: str = WandbConfig.project, entity: str | None = None, run_name: str | None = None,
                 console: TextIO | None = None, init_timeout: float = WandbConfig.init_timeout,
                 finish_timeout: float = 60.0, wandb_init: Mapping[str, Any] | None = None) -> None:
        if wandb_mode not in MODES:
            raise UserError(f"log.wandb.mode={wandb_mode!r} is not one of {', '.join(MODES)}; pick one of them")
        self.run_dir = Path(run_dir)
        self._console = console if console is not None else sys.stdout
        self._last_step: int | None = None
        self._closed = False
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = JsonlSink(self.run_dir / JSONL_NAME)
        self.wandb = WandbSink(self.run_dir, wandb_mode, json.loads(json.dumps(dict(config), default=str)),
                               project, entity, run_name, float(init_timeout), float(finish_timeout), self._print,
                               init_args=dict(wandb_init or {}))

    @property
    def wandb_mode(self) -> str:
        return self.wandb.mode

    @property
    def wandb_run(self) -> Any:
        """The live wandb Run, or None when W&B is off."""
        return self.wandb.run

    @property
    def wandb_run_id(self) -> str | None:
        return self.wandb.run_id

    @property
    def wandb_dir(self) -> Path | None:
        return self.wandb.dir if self.wandb.run_id else None

    @property
    def wandb_run_dir(self) -> Path | None:
        """This process's W&B run folder (``run_dir/wandb/offline-run-*`` or ``run-*``)."""
        return None if self.wandb.run is None else Path(self.wandb.run.dir).parent

    def log(self, step: int, values: Mapping[str, Any], *, console: bool = True, line: str | None = None) -> None:
        """Record `values` at `step`: a console line (`line` where given, else every value by
        `format_line`; none where `console` is False), a JSONL row, a W&B history row."""
        if self._closed:
            return
        for key in _RESERVED_KEYS:
            if key in values:
                raise ValueError(f"metrics key {key!r} is reserved; Metrics.log adds it itself")
        step = self._last_step = int(step)
        values = {str(k): _scalar(v) for k, v in values.items()}
        if console:
            self._print(line if line is not None else format_line(step, values))
        self.jsonl.write({"step": step, "time": round(time.time(), 3), **values})
        self.wandb.call(lambda run: run.log(values, step=step))

    def log_text(self, step: int, key: str, text: str) -> None:
        """Record a text (e.g. a generated sample): console, JSONL, and W&B as an HTML panel."""
        if self._closed:
            return
        step = self._last_step = int(step)
        # one labelled line: the text's newlines and quotes escaped (JSON's string form), so that it never
        # reads as loose console lines
        self._print(f"{key} @ step {step}: {json.dumps(str(text), ensure_ascii=False)}")
        self.jsonl.write({"step": step, "time": round(time.time(), 3), key: str(text)})
        self.wandb.log_text(step, key, str(text))

    def summary(self, values: Mapping[str, Any], *, console: bool = True) -> None:
        """Final numbers (e.g. valid/test scores): a JSONL ``summary`` row and the W&B run summary (and a
        console line unless `console` is False: where the caller prints them once in its own words)."""
        if self._closed:
            return
        values = {str(k): _scalar(v) for k, v in values.items()}
        if console:
            self._print("summary | " + " | ".join(format_item(k, v) for k, v in values.items()))
        row: dict[str, Any] = {"time": round(time.time(), 3), "summary": values}
        if self._last_step is not None:
            row = {"step": self._last_step, **row}
        self.jsonl.write(row)
        self.wandb.call(lambda run: run.summary.update(values))

    def truncate_after(self, step: int) -> int:
        """Drop JSONL rows past `step` (a crashed tail past the restored checkpoint); see `JsonlSink`."""
        return self.jsonl.truncate_after(step)

    def close(self) -> None:
        """Finish W&B, close the JSONL. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.wandb.close()
        self.jsonl.close()

    def _print(self, line: str) -> None:
        print(line, file=self._console, flush=True)


class _NoMetrics:
    """What ranks other than 0 log to: nothing."""

    def log(self, step: int, values: Mapping[str, Any], *, console: bool = True, line: str | None = None) -> None:
        pass

    def log_text(self, step: int, key: str, text: str) -> None:
        pass

    def summary(self, values: Mapping[str, Any], *, console: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


NO_METRICS = _NoMetrics()
