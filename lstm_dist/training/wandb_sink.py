"""The W&B sink of `metrics.Metrics`: a run started, fed and finished without ever stopping training."""

from __future__ import annotations

import html
import os
import secrets
import shutil
import string
from pathlib import Path
from typing import Any, Callable

from lstm_dist.common.atomic import atomic_write_text
from lstm_dist.common.errors import first_line

RUN_ID_NAME = "wandb_run_id"
# WANDB_MODE's values as wandb reads them (`dryrun` and `run` are its old names for offline and online)
ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def new_run_id() -> str:
    """A fresh W&B run id: 8 characters of [a-z0-9], as wandb makes them."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def wandb_finds_key() -> bool:
    """Whether wandb would find an API key for an online run (WANDB_API_KEY, the netrc, `wandb login`),
    whatever WANDB_MODE says; no prompt, no network. False where wandb is not installed."""
    try:
        import wandb

        # wandb.login answers False without looking while WANDB_MODE says offline or disabled, so ask
        # as for the online run about to start (its init's mode= wins over WANDB_MODE as well); and
        # silently, else it asks the server who is logged in (5 s where the server is out of reach).
        # wandb's global settings are put back afterwards.
        settings = wandb.setup().settings
        before = {"mode": settings.mode, "silent": settings.silent}
        wandb.setup(wandb.Settings(mode="online", silent=True))
        try:
            return bool(wandb.login(prompt=False, verify=False))
        finally:
            wandb.setup(wandb.Settings(**before))
    except Exception:  # noqa: BLE001 - wandb raises UsageError("No API key configured") and kin
        return False


def choose_mode(mode: str, wandb_mode_env: str, has_key: Callable[[], bool], files: Path) -> tuple[str, list[str]]:
    """The W&B mode to start for `log.wandb.mode` = `mode` with the environment's `WANDB_MODE` =
    `wandb_mode_env` ("" when unset), and the lines that tell the user what was decided that they
    did not spell out (`files`: where W&B's files go, named in them). Returns (mode, lines), mode one
    of online, offline, disabled (or WANDB_MODE's own unknown value under `auto`, which init refuses).

    `auto` follows WANDB_MODE when it is set, else goes online when `has_key()`. An explicit mode wins
    over WANDB_MODE, as `wandb.init(mode=...)` wins over it in wandb itself; when they differ one line
    says so. Online without a key, whatever chose it, becomes offline with one warning line."""
    raw = wandb_mode_env.strip()
    env_mode = ENV_MODES.get(raw.lower()) if raw else None
    lines: list[str] = []
    key_checked = False
    if mode == "auto":
        if raw:
            mode, why = env_mode or raw.lower(), f"WANDB_MODE={raw}"
        elif has_key():
            mode, why, key_checked = "online", "W&B found an API key", True
        else:
            mode, why = "offline", "no W&B API key found (set WANDB_API_KEY or run `wandb login` for online)"
            key_checked = True
        lines.append(f"W&B mode auto -> {mode}: {why}" + ("" if mode == "disabled" else f"; files in {files}"))
    elif raw and env_mode != mode:
        lines.append(f"W&B {mode}: log.wandb.mode={mode} wins over WANDB_MODE={raw} in the environment "
                     f"(as wandb.init(mode=...) wins over it); log.wandb.mode=auto follows WANDB_MODE")
    if mode == "online" and not key_checked and not has_key():
        lines.append(f"warning: W&B online needs an API key (set WANDB_API_KEY or run `wandb login`); "
                     f"logging offline to {files}")
        mode = "offline"
    return mode, lines


class WandbSink:
    """A W&B run that can never stop training.

    What wandb does itself and we leave to it (checked against wandb 0.31.0): finding the API key
    (`wandb.login(prompt=False, verify=False)` reads WANDB_API_KEY, the netrc and the host `wandb login`
    saved) and bounding init and finish (`Settings(init_timeout, finish_timeout)`). What it cannot
    do, and this class does:
    - the mode (`choose_mode`): `auto` follows `WANDB_MODE` when it is set, else goes online only
      when a key is configured (a keyless online init fails in a batch job); an explicit `online`,
      `offline` or `disabled` wins over `WANDB_MODE`, as `wandb.init(mode=...)` wins over it in wandb
      itself, and when the two differ one line says so (and that `auto` follows `WANDB_MODE`).
      Online without a key, whichever chose it, is offline with one warning;
    - the run id: made here before the first init (`WANDB_RUN_ID` when set, else a fresh one) and kept
      in ``run_dir/wandb_run_id``, so a restarted job continues the same W&B run (with `keep_id=False`,
      a fresh id each time, kept nowhere: every start is a W&B run of its own, as `lr_find`'s are);
    - wandb not installed: W&B is off, said in one line (`disabled` never imports it);
    - an online init that fails (no server, a timeout) falls back to offline with that same run id
      (so `wandb sync` later fills the same run), and the failed attempt's folder
      (``run_dir/wandb/run-*-<id>``, a stub that would sync as an empty run) is removed;
    - any exception later (a dead service, a full disk) switches W&B off with one warning;
    - the console: what the process prints to sys.stdout and sys.stderr while the run is open (the log
      lines, evaluations, samples, warnings, the `done:` line) is the run's console log, W&B's Logs tab
      (`console="wrap"`; offline, `files/output.log` and the run's records, uploaded by `wandb sync`).
    """

    def __init__(self, run_dir: Path, mode: str, config: dict, project: str, entity: str | None,
                 run_name: str | None, init_timeout: float, finish_timeout: float, say, keep_id: bool = True,
                 init_args: dict | None = None) -> None:
        self.run_dir, self.say, self.keep_id = run_dir, say, keep_id
        self._init_args = dict(init_args or {})  # more of wandb.init's arguments (tags, group, notes)
        self.dir = run_dir / "wandb"
        self.mode = "disabled"  # the mode actually in use
        self.run: Any = None
        self.run_id: str | None = None
        self._settings = dict(init_timeout=init_timeout, finish_timeout=finish_timeout)
        self._start(mode, config, project, entity, run_name)

    def _start(self, mode: str, config: dict, project: str, entity: str | None, run_name: str | None) -> None:
        mode, lines = choose_mode(mode, os.environ.get("WANDB_MODE", ""), wandb_finds_key, self.dir)
        for line in lines:
            self.say(line)
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError as exc:
            self.say(f"warning: W&B {mode} needs the wandb package, which cannot be imported ({first_line(exc)}); "
                     "W&B is off (pip install wandb, or set log.wandb.mode=disabled to silence this)")
            return

        self.dir.mkdir(parents=True, exist_ok=True)
        id_path = self.run_dir / RUN_ID_NAME
        saved_id = id_path.read_text(encoding="utf-8").strip() if self.keep_id and id_path.exists() else ""
        if self.keep_id:
            run_id = saved_id or os.environ.get("WANDB_RUN_ID", "").strip() or new_run_id()
            if not saved_id:  # kept before the first init: the offline retry and every later start use it
                atomic_write_text(id_path, run_id + "\n")
        else:
            run_id = new_run_id()
        before = set(self.dir.iterdir())

        def init(init_mode: str) -> Any:
            settings = wandb.Settings(
                **self._settings,
                # the run's Logs tab: wandb wraps sys.stdout's and sys.stderr's write (wandb's "auto" on Linux),
                # so rank 0's lines from here to finish reach W&B as they reach the console; output
                # written below Python (a C library's own prints to the file descriptors) is not captured,
                # which "redirect" would do by swapping the descriptors under torchrun's pipes
                console="wrap",
                quiet=True,  # no banners; warnings stay visible (also skips a slow viewer query)
                reinit="create_new",  # this object owns its run; never reuse a global one
            )
            return wandb.init(project=project, entity=entity, name=run_name, id=run_id, resume="allow",
                              dir=str(self.run_dir), mode=init_mode, config=config, settings=settings,
                              **self._init_args)

        try:
            run = init(mode)
        except Exception as exc:  # noqa: BLE001 - W&B must never take training down
            if mode != "online":
                self.say(f"warning: W&B {mode} init failed ({first_line(exc)}); W&B is off, metrics.jsonl goes on")
                return
            self.say(f"warning: W&B online init failed ({first_line(exc)}); logging offline to {self.dir} "
                     f"as run {run_id} (upload later with `wandb sync`)")
            # wandb keeps the failed run's stream registered in its service ("run ID ... is in use"
            # on a retry with the same id), so restart the service first. Only this object uses
            # wandb in a training process, so nothing else is torn down with it.
            mode = "offline"
            try:
                wandb.teardown()
                self._remove_failed_attempt(before, run_id)
                run = init(mode)
            except Exception as exc2:  # noqa: BLE001
                self.say(f"warning: W&B offline init failed ({first_line(exc2)}); W&B is off, metrics.jsonl goes on")
                return
        self.run, self.mode, self.run_id = run, mode, run.id
        if mode == "online":
            url = getattr(run, "url", None) or ""
            self.say(f"W&B online: {'resumed' if saved_id else 'run'} {run.id} {url}".rstrip())

    def _remove_failed_attempt(self, before: set, run_id: str) -> None:
        """Remove the folder a failed online init left (``run-<time>-<id>``, made since `before`):
        it holds no data, and `wandb sync` would make an empty run of it. Folders of earlier starts
        stay."""
        for path in set(self.dir.iterdir()) - before:
            if path.name.startswith("run-") and path.name.endswith(f"-{run_id}") and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)

    def call(self, fn: Any) -> None:
        """Run `fn(run)`; on any error warn once, switch W&B off, and let training go on."""
        if self.run is None:
            return
        try:
            fn(self.run)
        except Exception as exc:  # noqa: BLE001 - W&B must never take training down
            run, self.run, self.mode = self.run, None, "disabled"
            self.say(f"warning: W&B failed ({type(exc).__name__}: {first_line(exc)}); W&B is off for the rest "
                     "of this run, metrics.jsonl goes on")
            try:
                run.finish()
            except Exception:  # noqa: BLE001 - best effort
                pass

    def log_text(self, step: int, key: str, text: str) -> None:
        if self.run is None:  # disabled (or fallen back to disabled): nothing to log, and no wandb import (~0.5 s)
            return
        import wandb

        panel = lambda: wandb.Html(f"<pre>{html.escape(text)}</pre>", inject=False)  # noqa: E731
        self.call(lambda run: run.log({key: panel()}, step=step))

    def close(self) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish()
        except Exception as exc:  # noqa: BLE001
            self.say(f"warning: W&B finish failed ({first_line(exc)}); data stays under {self.dir}")
            return
        if self.mode == "offline":
            self.say(f"W&B offline run saved; upload it with: wandb sync {self.dir}/offline-run-*")
