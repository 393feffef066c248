"""The W&B sink of `metrics.Metrics`: a run started, fed and finished without ever stopping training."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from lstm_dist.atomic import atomic_write_text
from lstm_dist.errors import first_line

RUN_ID_NAME = "wandb_run_id"


class WandbSink:
    """A W&B run that can never stop training.

    What wandb does itself and we leave to it (checked against wandb 0.31.0): finding the API key
    (`wandb.login(prompt=False, verify=False)` reads WANDB_API_KEY, the netrc and the host `wandb login`
    saved),
    `WANDB_MODE`, making a run id, and bounding init and finish
    (`Settings(init_timeout, finish_timeout)`). What it cannot do, and this class does:
    - `auto`: online only when a key is configured (a keyless online init fails in a batch job);
    - an online init that fails (no server, a timeout) falls back to offline with the same run id;
    - the run id kept in ``run_dir/wandb_run_id``, so a restarted job continues the same W&B run;
    - any exception later (a dead service, a full disk) switches W&B off with one warning.
    """

    def __init__(self, run_dir: Path, mode: str, config: dict, project: str, entity: str | None,
                 run_name: str | None, init_timeout: float, finish_timeout: float, say) -> None:
        self.run_dir, self.say = run_dir, say
        self.dir = run_dir / "wandb"
        self.mode = "disabled"  # the mode actually in use
        self.run: Any = None
        self.run_id: str | None = None
        self._settings = dict(init_timeout=init_timeout, finish_timeout=finish_timeout)
        self._start(mode, config, project, entity, run_name)

    def _has_key(self) -> bool:
        import wandb

        try:  # no prompt, no network: only whether wandb would find a key
            return bool(wandb.login(prompt=False, verify=False))
        except Exception:  # noqa: BLE001 - wandb raises UsageError("No API key configured") and kin
            return False

    def _start(self, mode: str, config: dict, project: str, entity: str | None, run_name: str | None) -> None:
        if mode == "auto":
            if os.environ.get("WANDB_MODE"):
                mode, why = os.environ["WANDB_MODE"].lower(), f"WANDB_MODE={os.environ['WANDB_MODE']}"
            elif self._has_key():
                mode, why = "online", "W&B found an API key"
            else:
                mode, why = "offline", "no W&B API key found (set WANDB_API_KEY or run `wandb login` for online)"
            mode = "offline" if mode == "dryrun" else mode
            self.say(f"W&B mode auto -> {mode}: {why}" + ("" if mode == "disabled" else f"; files in {self.dir}"))
        elif mode == "online" and not self._has_key():
            self.say(f"warning: W&B online needs an API key (set WANDB_API_KEY or run `wandb login`); "
                     f"logging offline to {self.dir}")
            mode = "offline"
        if mode == "disabled":
            return
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        id_path = self.run_dir / RUN_ID_NAME
        saved_id = id_path.read_text(encoding="utf-8").strip() if id_path.exists() else ""

        def init(init_mode: str) -> Any:
            settings = wandb.Settings(
                **self._settings,
                console="off",  # leave stdout unwrapped: the metrics reach W&B directly
                quiet=True,  # no banners; warnings stay visible (also skips a slow viewer query)
                reinit="create_new",  # this object owns its run; never reuse a global one
            )
            return wandb.init(project=project, entity=entity, name=run_name, id=saved_id or None, resume="allow",
                              dir=str(self.run_dir), mode=init_mode, config=config, settings=settings)

        try:
            run = init(mode)
        except Exception as exc:  # noqa: BLE001 - W&B must never take training down
            if mode != "online":
                self.say(f"warning: W&B {mode} init failed ({first_line(exc)}); W&B is off, metrics.jsonl goes on")
                return
            self.say(f"warning: W&B online init failed ({first_line(exc)}); logging offline to {self.dir} "
                     "(upload later with `wandb sync`)")
            # wandb keeps the failed run's stream registered in its service ("run ID ... is in use"
            # on a retry with the same id), so restart the service first. Only this object uses
            # wandb in a training process, so nothing else is torn down with it.
            mode = "offline"
            try:
                wandb.teardown()
                run = init(mode)
            except Exception as exc2:  # noqa: BLE001
                self.say(f"warning: W&B offline init failed ({first_line(exc2)}); W&B is off, metrics.jsonl goes on")
                return
        self.run, self.mode, self.run_id = run, mode, run.id
        if not saved_id:  # wandb made the id; keep it for the next start of this run directory
            atomic_write_text(id_path, run.id + "\n")
        if mode == "online":
            url = getattr(run, "url", None) or ""
            self.say(f"W&B online: {'resumed' if saved_id else 'run'} {run.id} {url}".rstrip())

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
