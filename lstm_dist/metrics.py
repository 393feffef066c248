"""One `log(step, values)` that feeds the console, `metrics.jsonl` and Weights & Biases.

Rank 0 builds a `Metrics`; every other rank builds `Metrics(..., enabled=False)`, which does
nothing at all (no files, no wandb import). The training loop only ever talks to this object.

Three sinks, in order of trust:

- console: one compact line per `log` call, e.g.
  ``step 120 | epoch 0 | loss 1.8342 | bpc 2.6461 | lr 3.00e-03 | tok/s 51234``;
- ``run_dir/metrics.jsonl``: one JSON object per call (``step``, wall-clock ``time`` in Unix
  seconds, then the values), flushed every call, appended across resumes. It is strict JSON
  (``json.dumps(allow_nan=False)``): a non-finite float (a diverged loss) is written as
  ``null``, which pandas/jq/DuckDB read as a missing number; the console and W&B keep the exact
  ``nan``/``inf``. This file is the record of truth: W&B failing never stops it;
- Weights & Biases, rank 0 only, files under ``run_dir/wandb/``. W&B is optional equipment:
  any failure (no key, no network, a crash inside wandb) falls back to offline or switches W&B
  off with one warning line, and training carries on.

Modes (``log.wandb.mode``): ``online``, ``offline``, ``disabled``, ``auto``. ``auto`` honours
``WANDB_MODE``/``WANDB_DISABLED`` when set, else picks online when an API key is configured
(``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, or a netrc entry for the W&B host), checked
without touching the network, and offline otherwise, saying so in one line.

Resume: the W&B run id lives in ``run_dir/wandb_run_id``; a new `Metrics` on the same run dir
passes ``id=<that id>, resume="allow"`` so the run continues. After restoring a checkpoint at
step S the loop calls `truncate_after(S)` so the JSONL holds no rows from a crashed tail.
(W&B itself keeps such rows: it refuses steps lower than ones it already has, and says so.)
"""

from __future__ import annotations

import configparser
import dataclasses
import html
import json
import math
import netrc
import os
import secrets
import string
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, TextIO
from urllib.parse import urlsplit

from lstm_dist.atomic import atomic_write_text
from lstm_dist.errors import UserError

MODES = ("online", "offline", "disabled", "auto")
JSONL_NAME = "metrics.jsonl"
RUN_ID_NAME = "wandb_run_id"
DEFAULT_BASE_URL = "https://api.wandb.ai"
# wandb.init gets `init_timeout`; our own hard cap adds this much slack on top (wandb itself
# adds a 10 s grace), so a wedged service can never hold training longer than that.
_HARD_CAP_SLACK_S = 15.0
_RESERVED_KEYS = ("step", "time")


# ----------------------------------------------------------------------------- key detection


def _wandb_base_url() -> str:
    """The W&B server URL: WANDB_BASE_URL, else the one `wandb login --host` saved, else SaaS."""
    if url := os.environ.get("WANDB_BASE_URL"):
        return url.rstrip("/")
    config_dir = os.environ.get("WANDB_CONFIG_DIR") or os.path.join(
        os.path.expanduser("~"), ".config", "wandb"
    )
    parser = configparser.ConfigParser()
    try:
        parser.read(os.path.join(config_dir, "settings"))
        url = parser.get("default", "base_url", fallback="")
    except (configparser.Error, OSError):
        url = ""
    return (url or DEFAULT_BASE_URL).rstrip("/")


def _netrc_path() -> Path:
    if path := os.environ.get("NETRC"):
        return Path(path).expanduser()
    for name in ("~/.netrc", "~/_netrc"):
        if (path := Path(name).expanduser()).exists():
            return path
    return Path("~/.netrc").expanduser()


def api_key_source(base_url: str | None = None) -> str | None:
    """Where a W&B credential would come from (a short description), or None. No network."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    if os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "WANDB_IDENTITY_TOKEN_FILE"
    host = urlsplit(base_url or _wandb_base_url()).netloc
    path = _netrc_path()
    if not host or not path.is_file():
        return None
    try:
        creds = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError):
        return None
    return f"{path} ({host})" if creds and creds[2] else None


def resolve_mode(mode: str) -> tuple[str, str]:
    """The W&B mode to start in for a configured `mode`, and why (for the console line)."""
    if mode not in MODES:
        raise UserError(f"log.wandb.mode={mode!r} is not one of {', '.join(MODES)}; pick one of them")
    if mode != "auto":
        return mode, f"log.wandb.mode={mode}"
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled", "WANDB_DISABLED is set"
    env_mode = os.environ.get("WANDB_MODE", "").lower()
    if env_mode in ("online", "offline", "disabled"):
        return env_mode, f"WANDB_MODE={env_mode}"
    if env_mode == "dryrun":
        return "offline", "WANDB_MODE=dryrun"
    source = api_key_source()
    if source:
        return "online", f"W&B credentials from {source}"
    return "offline", "no W&B API key found (set WANDB_API_KEY or run `wandb login` for online)"


# ----------------------------------------------------------------------------- value helpers


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


def _config_dict(config: Any) -> dict:
    """The resolved config as a JSON-able dict (paths as strings), from a dict or a dataclass."""

    def plain(value: Any) -> Any:
        if isinstance(value, float) or isinstance(value, (str, bool, int)) or value is None:
            return value
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value)

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return plain(dict(config or {}))


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


def format_line(step: int, values: Mapping[str, Any]) -> str:
    return " | ".join([f"step {step}"] + [f"{k} {format_value(v)}" for k, v in values.items()])


def new_run_id() -> str:
    """An 8-character W&B run id (lowercase letters and digits, like wandb's own)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


# ----------------------------------------------------------------------------- the object


class Metrics:
    """Console + metrics.jsonl + W&B for one run. Build on rank 0; `enabled=False` elsewhere."""

    def __init__(
        self,
        run_dir: Path,
        config: Mapping[str, Any],
        *,
        wandb_mode: str = "auto",
        project: str = "lstm_dist",
        entity: str | None = None,
        run_name: str | None = None,
        enabled: bool = True,
        console: TextIO | None = None,
        init_timeout: float = 30.0,
        finish_timeout: float = 60.0,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.wandb_mode = "disabled"  # the mode actually in use
        self.wandb_run_id: str | None = None
        self.wandb_dir: Path | None = None
        self._console = console if console is not None else sys.stdout
        self._finish_timeout = float(finish_timeout)
        self._run: Any = None  # the wandb Run, while W&B is live
        self._jsonl: TextIO | None = None
        self._last_step: int | None = None
        self._closed = False
        if not enabled:
            return

        requested, why = resolve_mode(wandb_mode)  # may raise UserError before any file is made
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / JSONL_NAME
        self._open_jsonl()
        if wandb_mode == "auto":  # say what auto picked, and why, in one line
            where = "" if requested == "disabled" else f"; files in {self.run_dir / 'wandb'}"
            self._print(f"W&B mode auto -> {requested}: {why}{where}")
        if requested != "disabled":
            self._start_wandb(requested, _config_dict(config), project, entity, run_name,
                              float(init_timeout))

    # -- public API ----------------------------------------------------------------------

    @property
    def wandb_run(self) -> Any:
        """The live wandb Run (for extras such as `run.watch`), or None when W&B is off."""
        return self._run

    @property
    def wandb_run_dir(self) -> Path | None:
        """This process's W&B run folder (``run_dir/wandb/offline-run-*`` or ``run-*``)."""
        if self._run is None:
            return None
        try:
            return Path(self._run.dir).parent
        except Exception:
            return None

    def log(self, step: int, values: Mapping[str, Any], *, console: bool = True) -> None:
        """Record `values` at `step`: a console line, a JSONL row, a W&B history row."""
        if not self.enabled or self._closed:
            return
        for key in _RESERVED_KEYS:
            if key in values:
                raise ValueError(f"metrics key {key!r} is reserved; Metrics.log adds it itself")
        step = int(step)
        values = {str(k): _scalar(v) for k, v in values.items()}
        self._last_step = step
        if console:
            self._print(format_line(step, values))
        self._write_row({"step": step, "time": round(time.time(), 3), **values})
        self._wandb_call(lambda run: run.log(values, step=step))

    def log_text(self, step: int, key: str, text: str) -> None:
        """Record a text (e.g. a generated sample): console, JSONL, and W&B as an HTML panel."""
        if not self.enabled or self._closed:
            return
        step = int(step)
        self._last_step = step
        self._print(f"step {step} | {key}:\n{text}")
        self._write_row({"step": step, "time": round(time.time(), 3), key: str(text)})

        def send(run: Any) -> None:
            import wandb

            panel = wandb.Html(f"<pre>{html.escape(str(text))}</pre>", inject=False)
            run.log({key: panel}, step=step)

        self._wandb_call(send)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Final numbers (e.g. valid/test bpc): a JSONL ``summary`` row and the W&B run summary."""
        if not self.enabled or self._closed:
            return
        values = {str(k): _scalar(v) for k, v in values.items()}
        self._print("summary | " + " | ".join(f"{k} {format_value(v)}" for k, v in values.items()))
        row: dict[str, Any] = {"time": round(time.time(), 3), "summary": values}
        if self._last_step is not None:
            row = {"step": self._last_step, **row}
        self._write_row(row)
        self._wandb_call(lambda run: run.summary.update(values))

    def truncate_after(self, step: int) -> int:
        """Drop JSONL rows with ``step`` > `step` (a crashed tail past the restored checkpoint).

        Also drops torn lines (a crash mid-write). Rewrites the file atomically (temp + rename)
        and returns how many lines were dropped.
        """
        if not self.enabled or self._closed:
            return 0
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        kept: list[str] = []
        dropped = 0
        if self.jsonl_path.exists():
            for line in self.jsonl_path.read_text(encoding="utf-8").splitlines():
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
        atomic_write_text(self.jsonl_path, "".join(line + "\n" for line in kept))
        self._open_jsonl()
        return dropped

    def close(self) -> None:
        """Finish W&B (bounded by `finish_timeout`), close the JSONL. Idempotent."""
        if self._closed:
            return
        self._closed = True
        run, self._run = self._run, None
        if run is not None:
            where = self.wandb_dir
            offline = self.wandb_mode == "offline"
            finished = _call_with_deadline(run.finish, self._finish_timeout + _HARD_CAP_SLACK_S)
            if finished is _TIMED_OUT:
                self._warn(f"W&B finish took over {self._finish_timeout:.0f} s; left it behind "
                           f"(data stays under {where}; upload later with `wandb sync`)")
            elif isinstance(finished, BaseException):
                self._warn(f"W&B finish failed ({_short(finished)}); data stays under {where}")
            elif offline:
                self._print(f"W&B offline run saved; upload it with: wandb sync {where}/offline-run-*")
        if self._jsonl is not None:
            try:
                self._jsonl.flush()
                os.fsync(self._jsonl.fileno())
            except OSError:
                pass
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> "Metrics":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _print(self, line: str) -> None:
        print(line, file=self._console, flush=True)

    def _warn(self, message: str) -> None:
        self._print(f"warning: {message}")

    def _open_jsonl(self) -> None:
        # A crash can leave a last line without its newline; start ours on a fresh line.
        needs_newline = False
        if self.jsonl_path.exists() and self.jsonl_path.stat().st_size > 0:
            with open(self.jsonl_path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        if needs_newline:
            self._jsonl.write("\n")

    def _write_row(self, row: dict) -> None:
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(_json_safe(row), allow_nan=False) + "\n")
        self._jsonl.flush()

    def _wandb_call(self, fn: Any) -> None:
        """Run `fn(run)`; on any error warn once, switch W&B off, and let training go on."""
        if self._run is None:
            return
        try:
            fn(self._run)
        except Exception as exc:  # noqa: BLE001 - W&B must never take training down
            run, self._run = self._run, None
            self.wandb_mode = "disabled"
            self._warn(f"W&B failed ({_short(exc)}); W&B is off for the rest of this run, "
                       f"{self.jsonl_path} goes on")
            _call_with_deadline(run.finish, 10.0)  # best effort, bounded, errors ignored

    def _start_wandb(self, mode: str, config: dict, project: str, entity: str | None,
                     run_name: str | None, init_timeout: float) -> None:
        wandb_dir = self.run_dir / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        id_path = self.run_dir / RUN_ID_NAME
        run_id = id_path.read_text(encoding="utf-8").strip() if id_path.exists() else ""
        resuming = bool(run_id)
        if not run_id:
            run_id = new_run_id()
            atomic_write_text(id_path, run_id + "\n")

        if mode == "online" and api_key_source() is None:
            # wandb.init would prompt for a key (or fail); go offline now, with the fix in words.
            self._warn(f"W&B online needs an API key (set WANDB_API_KEY or run `wandb login`); "
                       f"logging offline to {wandb_dir}")
            mode = "offline"

        def init(init_mode: str) -> Any:
            import wandb

            settings = wandb.Settings(
                init_timeout=init_timeout,
                finish_timeout=self._finish_timeout,
                console="off",  # leave stdout unwrapped: the metrics reach W&B directly
                quiet=True,  # no banners; warnings stay visible (also skips a slow viewer query)
                reinit="create_new",  # this object owns its run; never reuse a global one
            )
            return wandb.init(
                project=project, entity=entity, name=run_name, id=run_id,
                resume="allow", dir=str(self.run_dir), mode=init_mode, config=config,
                settings=settings,
            )

        run = _call_with_deadline(lambda: init(mode), init_timeout + 2 * _HARD_CAP_SLACK_S,
                                  on_late=_finish_quietly)
        if mode == "online" and (run is _TIMED_OUT or isinstance(run, BaseException)):
            reason = "timed out" if run is _TIMED_OUT else _short(run)
            self._warn(f"W&B online init failed ({reason}); logging offline to {wandb_dir} "
                       f"(upload later with `wandb sync`)")
            mode = "offline"
            # wandb keeps the failed run's stream registered in its service ("run ID ... is in
            # use" on a retry with the same id), so restart the service first. Only this object
            # uses wandb in a training process, so nothing else is torn down with it.
            import wandb

            _call_with_deadline(wandb.teardown, _HARD_CAP_SLACK_S)
            run = _call_with_deadline(lambda: init(mode), init_timeout + 2 * _HARD_CAP_SLACK_S,
                                      on_late=_finish_quietly)
        if run is _TIMED_OUT or isinstance(run, BaseException):
            reason = "timed out" if run is _TIMED_OUT else _short(run)
            self._warn(f"W&B {mode} init failed ({reason}); W&B is off, {self.jsonl_path} goes on")
            return
        self._run = run
        self.wandb_mode = mode
        self.wandb_run_id = run_id
        self.wandb_dir = wandb_dir
        if mode == "online":
            url = getattr(run, "url", None) or ""
            self._print(f"W&B online: {'resumed' if resuming else 'run'} {run_id} {url}".rstrip())


# ----------------------------------------------------------------------------- bounded calls


class _TimedOut:
    def __repr__(self) -> str:
        return "<timed out>"


_TIMED_OUT = _TimedOut()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _finish_quietly(run: Any) -> None:
    """For an init that came back after we gave up on it: end that run so it does not linger."""
    try:
        run.finish()
    except Exception:
        pass


def _call_with_deadline(fn: Any, timeout: float, on_late: Any = None) -> Any:
    """`fn()` in a daemon thread: its result, the exception it raised, or `_TIMED_OUT`.

    A call that overruns is abandoned (it cannot be killed); if it later returns a value,
    `on_late(value)` runs in that thread so nothing it made is left half-open.
    """
    box: dict[str, Any] = {}
    lock = threading.Lock()

    def target() -> None:
        try:
            value: Any = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            value = exc
        with lock:
            late = box.get("abandoned", False)
            box["value"] = value
        if late and on_late is not None and not isinstance(value, BaseException):
            on_late(value)

    thread = threading.Thread(target=target, name="metrics-wandb", daemon=True)
    thread.start()
    thread.join(timeout)
    with lock:
        if "value" in box:
            return box["value"]
        box["abandoned"] = True
    return _TIMED_OUT
