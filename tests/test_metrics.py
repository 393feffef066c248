"""Tests for lstm_dist.metrics: console, metrics.jsonl and a REAL wandb run in offline mode.

Nothing here touches the network: the W&B server URL points at a closed local port, every W&B
directory lives under tmp_path, and what wandb wrote is read back with wandb's own reader,
`wandb leet inspect --json` (it prints the records of a run's .wandb transaction log).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lstm_dist.common.errors import UserError
from lstm_dist.training.metrics import Metrics, format_line

CLOSED_URL = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused


@pytest.fixture(autouse=True)
def wandb_env(tmp_path, monkeypatch):
    """Keep wandb inside tmp_path, without credentials and without a reachable server."""
    home = tmp_path / "home"
    home.mkdir()
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        path = tmp_path / name.lower()
        path.mkdir()
        monkeypatch.setenv(name, str(path))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / "no-such-netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", CLOSED_URL)
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_DISABLED",
                 "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME", "NETRC_FILE"):
        monkeypatch.delenv(name, raising=False)
    yield
    if "wandb" in sys.modules:  # forget session state (credentials, settings) between tests
        import wandb

        wandb.teardown()


def inspect_run(run_dir: Path) -> list[dict]:
    """Records of a W&B run folder, as read by wandb's own CLI."""
    env = dict(os.environ, WANDB_MODE="offline")
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def history(records: list[dict]) -> dict[int, dict]:
    """step -> merged history row."""
    rows: dict[int, dict] = {}
    for rec in records:
        if rec["type"] == "history":
            rows.setdefault(rec["history"]["step"].get("num", 0), {}).update(rec["history"]["item"])
    return rows


def run_record(records: list[dict]) -> dict:
    return next(rec["run"] for rec in records if rec["type"] == "run")


def summary_of(records: list[dict]) -> dict:
    merged: dict = {}
    for rec in records:
        if rec["type"] == "summary":
            merged.update(rec["summary"].get("update", {}))
    return merged


def console_of(records: list[dict]) -> str:
    """What a run captured of its process's console (W&B's Logs tab): stdout and stderr as written, in order."""
    return "".join(rec["output_raw"]["line"] for rec in records if rec["type"] == "output_raw")


def strict_rows(path: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON (NaN/Infinity tokens would raise)."""

    def reject(token: str):
        raise AssertionError(f"non-standard JSON token {token} in {path}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


CONFIG = {"model": {"hidden": 64, "layers": 2}, "optim": {"lr": 0.003}, "data": {"dir": Path("/data/x")}}


def test_offline_run_is_readable_back_with_wandb_tooling(tmp_path):
    out = io.StringIO()
    t0 = time.perf_counter()
    m = Metrics(tmp_path / "run", CONFIG, wandb_mode="offline", console=out, run_name="t1")
    init_s = time.perf_counter() - t0
    assert m.wandb_mode == "offline" and m.wandb_dir == tmp_path / "run" / "wandb"
    run_dir = m.wandb_run_dir
    assert run_dir is not None and run_dir.parent == m.wandb_dir
    # the names training logs (docs/metrics.md): W&B groups its panels by the part before the "/"
    logged = {0: {"train/epoch": 0, "train/loss": 2.5, "train/bpc": 3.6067},
              10: {"train/epoch": 0, "train/loss": 2.0, "train/bpc": 2.8854},
              20: {"train/epoch": 1, "train/loss": 1.75, "train/bpc": 2.5247, "train/lr": 3e-3}}
    for step, values in logged.items():
        m.log(step, values)
    m.log_text(20, "sample", "The <b>cat</b> sat\non the mat")
    m.summary({"val/bpc": 1.61, "test/bpc": 1.63})
    t0 = time.perf_counter()
    m.close()
    finish_s = time.perf_counter() - t0
    m.close()  # idempotent
    print(f"offline wandb init {init_s:.2f} s, finish {finish_s:.2f} s")

    records = inspect_run(run_dir)
    run = run_record(records)
    assert run["run_id"] == m.wandb_run_id == (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert run["project"] == "lstm_dist"
    config = run["config"]["update"]
    assert config["model"] == {"hidden": 64, "layers": 2}
    assert config["optim"]["lr"] == 0.003 and config["data"]["dir"] == "/data/x"
    rows = history(records)
    for step, values in logged.items():
        for key, value in values.items():
            assert rows[step][key] == pytest.approx(value), (step, key)
    # The text is an HTML media file of the run; its path is in the history row.
    media = run_dir / "files" / rows[20]["sample.path"]
    assert "The &lt;b&gt;cat&lt;/b&gt; sat\non the mat" in media.read_text()
    summary = summary_of(records)
    assert summary["val/bpc"] == pytest.approx(1.61) and summary["test/bpc"] == pytest.approx(1.63)
    assert any(rec["type"] == "exit" for rec in records)  # finish really happened

    jsonl = strict_rows(tmp_path / "run" / "metrics.jsonl")
    metric_rows = [r for r in jsonl if "train/loss" in r]
    assert [r["step"] for r in metric_rows] == [0, 10, 20]
    for row in metric_rows:
        assert {k: row[k] for k in logged[row["step"]]} == logged[row["step"]]
        assert abs(row["time"] - time.time()) < 600
    assert {"step": 20, "sample": "The <b>cat</b> sat\non the mat"}.items() <= jsonl[3].items()
    assert jsonl[4]["summary"] == {"val/bpc": 1.61, "test/bpc": 1.63}
    text = out.getvalue()
    assert "step 20 | train/epoch 1 | train/loss 1.7500 | train/bpc 2.5247 | train/lr 3.00e-03" in text
    assert "The <b>cat</b> sat" in text and "test/bpc 1.6300" in text


def test_online_without_key_falls_back_to_offline_quickly(tmp_path):
    out = io.StringIO()
    t0 = time.perf_counter()
    m = Metrics(tmp_path / "run", CONFIG, wandb_mode="online", console=out)
    seconds = time.perf_counter() - t0
    print(f"online (no key) -> offline fallback in {seconds:.2f} s")
    assert seconds < 60
    assert m.wandb_mode == "offline"
    assert "warning: W&B online needs an API key" in out.getvalue()
    m.log(5, {"loss": 1.25})
    run_dir = m.wandb_run_dir
    m.close()
    assert history(inspect_run(run_dir))[5]["loss"] == 1.25
    assert strict_rows(tmp_path / "run" / "metrics.jsonl")[0]["loss"] == 1.25


def assert_fell_back_under_one_run_id(run: Path, warning: str) -> str:
    """After an online start failed: one W&B folder under run/wandb, the offline run's, under the id
    kept in run/wandb_run_id and named in the warning; the failed attempt left no `run-*` folder
    (which `wandb sync` would turn into a second, empty run). Returns the id."""
    run_id = (run / "wandb_run_id").read_text().strip()
    folders = sorted(p.name for p in (run / "wandb").iterdir() if p.is_dir() and not p.is_symlink())
    assert len(folders) == 1 and folders[0].startswith("offline-run-") and folders[0].endswith(f"-{run_id}"), folders
    assert f"as run {run_id} " in warning, warning
    return run_id


def test_online_with_unreachable_server_falls_back_within_init_timeout_and_captures_the_console(tmp_path, monkeypatch):
    """A server that never answers: offline within init_timeout under the same run id, and the offline run
    captures the console from then on (W&B's Logs tab). In a process of its own, as rank 0 of a job is:
    wandb wraps the write of sys.stdout and sys.stderr when it is first imported, so a test's captured
    streams would say nothing of a job's."""
    # A key is configured, so wandb.init really tries the (closed) server and has to time out.
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    # ... also with WANDB_MODE=offline in the environment: log.wandb.mode=online wins, as in wandb
    monkeypatch.setenv("WANDB_MODE", "offline")
    script = f"""if True:
        import sys, time
        from pathlib import Path
        from lstm_dist.training.metrics import Metrics
        t0 = time.perf_counter()
        m = Metrics(Path({str(tmp_path / "run")!r}), {{}}, wandb_mode="online", init_timeout=3)
        print(f"init took {{time.perf_counter() - t0:.2f}} s", file=sys.stderr, flush=True)
        m.log(1, {{"train/loss": 0.5}})
        print("warning: a line on stderr", file=sys.stderr, flush=True)
        print("WANDB", m.wandb_mode, m.wandb_run_id, m.wandb_run_dir, flush=True)
        m.close()
        """
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    seconds = float(proc.stderr.split("init took ")[1].split(" s")[0])
    print(f"online (server unreachable, init_timeout=3) -> offline fallback in {seconds:.2f} s")
    assert seconds < 3 + 30  # init_timeout plus bounded slack, never wandb's 90 s default
    lines = proc.stdout.splitlines()
    assert "WANDB_MODE=offline" in lines[0] and "log.wandb.mode=online wins" in lines[0], lines
    assert lines[1].startswith("warning: W&B online init failed") and "API key" not in proc.stdout, lines
    _, mode, run_id, folder = next(line for line in lines if line.startswith("WANDB ")).split()
    assert mode == "offline"
    records = inspect_run(Path(folder))
    kept = assert_fell_back_under_one_run_id(tmp_path / "run", lines[1])
    assert run_record(records)["run_id"] == run_id == kept
    assert history(records)[1]["train/loss"] == 0.5
    # the console from the offline run's start to its finish, stdout and stderr, as the process wrote it
    console = console_of(records)
    assert "step 1 | train/loss 0.5000\n" in console and "warning: a line on stderr\n" in console, console
    assert "warning: W&B online init failed" not in console  # said before the run existed
    assert {rec["output_raw"].get("output_type") for rec in records if rec["type"] == "output_raw"} == {
        "STDOUT", "STDERR"}


def test_auto_picks_offline_without_key_and_says_so(tmp_path):
    out = io.StringIO()
    m = Metrics(tmp_path / "run", {}, wandb_mode="auto", console=out)
    try:
        assert m.wandb_mode == "offline"
        lines = [line for line in out.getvalue().splitlines() if "offline" in line]
        assert len(lines) == 1 and "no W&B API key found" in lines[0]
    finally:
        m.close()


def test_auto_goes_online_where_wandb_finds_a_key_and_follows_wandb_mode(tmp_path, monkeypatch):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1:9\n  login user\n  password " + "k" * 40 + "\n")  # the host of WANDB_BASE_URL
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    out = io.StringIO()
    m = Metrics(tmp_path / "a", {}, wandb_mode="auto", console=out, init_timeout=3)
    m.close()
    assert out.getvalue().splitlines()[0].startswith("W&B mode auto -> online: W&B found an API key")
    assert m.wandb_mode == "offline" and "W&B online init failed" in out.getvalue()  # the server is closed
    assert m.wandb_run_id == assert_fell_back_under_one_run_id(tmp_path / "a", out.getvalue().splitlines()[1])

    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = io.StringIO()
    m = Metrics(tmp_path / "b", {}, wandb_mode="auto", console=out)
    m.close()
    assert out.getvalue().splitlines() == ["W&B mode auto -> disabled: WANDB_MODE=disabled"]
    assert m.wandb_mode == "disabled" and not (tmp_path / "b" / "wandb").exists()
    with pytest.raises(UserError, match="log.wandb.mode"):
        Metrics(tmp_path / "c", {}, wandb_mode="cloud")


def test_an_explicit_wandb_mode_and_wandb_mode_in_the_environment_are_reconciled_in_one_line(tmp_path, monkeypatch):
    """log.wandb.mode online/offline/disabled wins over WANDB_MODE (as wandb.init(mode=...) wins over it
    in wandb 0.31) and one line says so where they differ; the key is looked for whatever WANDB_MODE
    says; online without a key, however chosen, is offline with one warning. The real key lookup."""
    from lstm_dist.training.wandb_sink import choose_mode, wandb_finds_key

    files = tmp_path / "run" / "wandb"

    def choose(mode: str, env: str) -> tuple[str, list[str]]:
        import wandb

        wandb.teardown()  # as in a new process: wandb keeps the credentials it found and the environment it read
        monkeypatch.setenv("WANDB_MODE", env)
        return choose_mode(mode, env, wandb_finds_key, files)

    def names_env(line: str, mode: str, env: str) -> bool:
        return line.startswith(f"W&B {mode}: log.wandb.mode={mode} wins over WANDB_MODE={env}") and "auto" in line

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    for env in ("offline", "disabled", "dryrun"):  # a key, and the environment says not online
        mode, lines = choose("online", env)
        assert mode == "online" and len(lines) == 1 and names_env(lines[0], "online", env), (env, lines)
    for mode, env in (("offline", "online"), ("disabled", "offline"), ("offline", "disabled")):
        chosen, lines = choose(mode, env)
        assert chosen == mode and len(lines) == 1 and names_env(lines[0], mode, env), (mode, env, lines)
    assert choose("offline", "dryrun") == ("offline", []) and choose("online", "online") == ("online", [])

    monkeypatch.delenv("WANDB_API_KEY")
    mode, lines = choose("online", "offline")
    assert mode == "offline" and len(lines) == 2 and names_env(lines[0], "online", "offline"), lines
    assert lines[1].startswith("warning: W&B online needs an API key"), lines
    mode, lines = choose("auto", "online")  # WANDB_MODE asked for online, and there is no key
    assert mode == "offline" and lines[0].startswith("W&B mode auto -> online: WANDB_MODE=online"), lines
    assert len(lines) == 2 and lines[1].startswith("warning: W&B online needs an API key"), lines

    # and through Metrics, where it costs nothing: disabled wins over WANDB_MODE=offline, said once
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = io.StringIO()
    m = Metrics(tmp_path / "run", {}, wandb_mode="disabled", console=out)
    m.close()
    assert m.wandb_mode == "disabled" and not files.exists()
    assert len(out.getvalue().splitlines()) == 1 and names_env(out.getvalue(), "disabled", "offline"), out.getvalue()


def test_disabled_writes_jsonl_only(tmp_path):
    out = io.StringIO()
    m = Metrics(tmp_path / "run", CONFIG, wandb_mode="disabled", console=out)
    m.log(3, {"loss": 1.0})
    m.log_text(3, "sample", "abc")
    m.summary({"test_bpc": 1.4})
    m.close()
    assert m.wandb_mode == "disabled" and m.wandb_dir is None and m.wandb_run is None
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]
    rows = strict_rows(tmp_path / "run" / "metrics.jsonl")
    assert [r.get("loss") for r in rows] == [1.0, None, None] and rows[1]["sample"] == "abc"
    assert "step 3 | loss 1.0000" in out.getvalue()


def test_resume_keeps_run_id_and_history_and_truncates_crashed_tail(tmp_path):
    run_dir = tmp_path / "run"
    first = Metrics(run_dir, CONFIG, wandb_mode="offline", console=io.StringIO())
    for step in (0, 10, 20, 30):
        first.log(step, {"loss": 3.0 - step / 10})
    first_dir, run_id = first.wandb_run_dir, first.wandb_run_id
    first.close()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "loss": 0.')  # the process died mid-line

    # Restart from the checkpoint at step 10: same W&B run, earlier rows kept.
    second = Metrics(run_dir, CONFIG, wandb_mode="offline", console=io.StringIO())
    assert second.wandb_run_id == run_id and second.wandb_run_dir != first_dir
    assert second.truncate_after(10) == 3  # steps 20, 30 and the torn line
    second.log(20, {"loss": 1.1})
    second_dir = second.wandb_run_dir
    second.close()

    rows = strict_rows(run_dir / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(0, 3.0), (10, 2.0), (20, 1.1)]
    # (that a first attempt's log holds the id it keeps in run_dir/wandb_run_id: the offline test above)
    records = inspect_run(second_dir)
    assert run_record(records)["run_id"] == run_id
    assert history(records)[20]["loss"] == 1.1
    assert not list(run_dir.glob(".metrics.jsonl.tmp*"))  # the atomic rewrite left no temp file


def test_wandb_failure_mid_run_does_not_stop_logging(tmp_path):
    out = io.StringIO()
    m = Metrics(tmp_path / "run", CONFIG, wandb_mode="offline", console=out)
    m.log(0, {"loss": 2.0})
    m.wandb_run.finish()  # the run dies underneath us: wandb's log() now raises UsageError
    m.log(1, {"loss": 1.5})  # must not raise
    m.log_text(1, "sample", "still here")
    m.log(2, {"loss": 1.25})
    m.summary({"test_bpc": 1.5})
    m.close()
    assert m.wandb_mode == "disabled" and m.wandb_run is None
    warnings = [line for line in out.getvalue().splitlines() if line.startswith("warning: W&B failed")]
    assert len(warnings) == 1, out.getvalue()
    rows = strict_rows(tmp_path / "run" / "metrics.jsonl")
    assert [r.get("loss") for r in rows] == [2.0, 1.5, None, 1.25, None]
    assert rows[-1]["summary"] == {"test_bpc": 1.5}


def test_non_finite_values_are_null_in_jsonl_and_visible_on_console(tmp_path):
    np = pytest.importorskip("numpy")
    out = io.StringIO()
    m = Metrics(tmp_path / "run", {}, wandb_mode="disabled", console=out)
    m.log(7, {"loss": float("nan"), "gnorm": float("inf"), "bpc": np.float32(1.5), "n": np.int64(3)})
    m.close()
    (row,) = strict_rows(tmp_path / "run" / "metrics.jsonl")
    assert row["loss"] is None and row["gnorm"] is None
    assert row["bpc"] == 1.5 and row["n"] == 3 and type(row["n"]) is int
    assert "step 7 | loss nan | gnorm inf | bpc 1.5000 | n 3" in out.getvalue()


def test_console_reads_as_a_person_reads_it_and_reserved_keys(tmp_path):
    line = format_line(120, {"epoch": 0, "loss": 1.83421, "bpc": 2.64612, "lr": 3e-3, "grad_norm": 0.47761,
                             "chars_per_s": 47713.2622, "data_ms": 0.2384, "fwd_bwd_ms": 220.5025,
                             "outside_fwd_bwd_pct": 4.4707, "eta_s": 229.5362, "eval_s": 1.234, "phase": "train"})
    assert line == ("step 120 | epoch 0 | loss 1.8342 | bpc 2.6461 | lr 3.00e-03 | grad_norm 0.4776 | 47.7k chars/s"
                    " | data 0.238 ms | fwd_bwd 221 ms | outside_fwd_bwd 4.5% | ETA 3m49s | eval 1.2s | phase train")
    assert format_line(1, {"eta_s": 5400.0, "chars_per_s": 1.25e6}) == "step 1 | ETA 1h30m | 1.25M chars/s"
    m = Metrics(tmp_path / "run", {}, wandb_mode="disabled", console=io.StringIO())
    with pytest.raises(ValueError, match="reserved"):
        m.log(1, {"step": 1})
    m.log(2, {"loss": 1.0, "chars_per_s": 47713.2622}, console=False)
    m.close()
    row = strict_rows(tmp_path / "run" / "metrics.jsonl")[0]
    assert row["loss"] == 1.0 and row["chars_per_s"] == 47713.2622  # the file keeps full precision


def test_installed_wandb_meets_the_floors_pyproject_declares():
    """The package needs wandb >= the `dependencies` floor, these tests >= the `dev` one; below them
    the failures above would be obscure (a missing keyword, a missing --json), so say it here."""
    import re
    from importlib.metadata import version

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floors = [tuple(map(int, f.split("."))) for f in re.findall(r'"wandb>=([0-9.]+)"', text)]
    installed = tuple(int(x) for x in re.findall(r"\d+", version("wandb"))[:3])
    assert len(floors) == 2 and floors[0] <= floors[1]  # the package's floor, then the tests'
    assert installed >= max(floors), f"wandb {version('wandb')} is older than pyproject.toml's floor {max(floors)}"


def test_a_fresh_start_keeps_no_rows_of_an_earlier_attempt_and_a_resume_only_those_before_it(tmp_path, capsys):
    """Kind: a wrong number must never be left standing. A run that failed before its first checkpoint
    (or whose checkpoints were set aside as diverged) is told to run again, and starts afresh in the
    same directory: its rows would read as the new run's (two points at step 5 on one plot)."""
    from lstm_dist.config import load
    from lstm_dist.training.loop import open_metrics

    cfg = load(None, [f"run.dir={tmp_path}", "run.name=r", "log.wandb.mode=disabled"])
    m = open_metrics(cfg, None)
    for step in (5, 10):
        m.log(step, {"loss": 31880.0 + step})
    m.close()
    m = open_metrics(cfg, 5)  # a resume from step 5 keeps the rows up to it
    m.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == [5]
    capsys.readouterr()
    m = open_metrics(cfg, None)  # starting fresh: nothing of the earlier attempt
    m.log(5, {"loss": 2.5})
    m.close()
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(5, 2.5)]
    assert f"starting fresh: 1 row(s) of an earlier attempt without a checkpoint removed from {tmp_path / 'r'}" in \
        capsys.readouterr().out


def test_mfu_has_a_peak_only_for_a_gpu_of_the_table_and_the_runs_arithmetic():
    """training.mfu: the datasheets' dense peaks by torch.cuda.get_device_name(), in the arithmetic of the run's
    products; an unknown name (another GPU, a MIG slice, the H200 NVL card, the CPU) has none, so no MFU."""
    from lstm_dist.training.mfu import matmul_precision, model_flops_utilization, peak_flops

    assert peak_flops("NVIDIA H200", "bf16") == peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert peak_flops("NVIDIA H200", "tf32") == pytest.approx(494.7e12)
    assert peak_flops("NVIDIA H200", "fp32") == pytest.approx(66.9e12)
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756.5e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == peak_flops("NVIDIA A100 80GB PCIe", "bf16") == 312e12
    for unknown in ("NVIDIA H200 NVL", "NVIDIA A100-SXM4-40GB MIG 1g.5gb", "NVIDIA GeForce RTX 4090", "cpu", ""):
        assert peak_flops(unknown, "bf16") is None, unknown
    with pytest.raises(ValueError, match="precision 'fp16' is not one of bf16, tf32, fp32"):
        peak_flops("NVIDIA H200", "fp16")
    assert (matmul_precision(bf16=True, tf32=True), matmul_precision(bf16=False, tf32=True),
            matmul_precision(bf16=False, tf32=False)) == ("bf16", "tf32", "fp32")
    # 1e6 tokens/s over 2 GPUs at 1e9 FLOPs a token: 5e14 FLOP/s each, half of a 1e15 peak
    assert model_flops_utilization(1e6, 1e9, 2, 1e15) == 0.5
    assert model_flops_utilization(1e6, 1e9, 2, None) is None


def test_the_log_line_shows_mfu_where_the_row_has_it():
    """The training line (loop.log_line) from a row of the names `Trainer._log` logs: MFU after the throughput
    where the row has perf/mfu (a CUDA run on a GPU of the table), nothing where it has none; the ETA is
    the line's own argument, not a metric."""
    from lstm_dist.config import load
    from lstm_dist.model.flops import training_flops_per_token
    from lstm_dist.training.loop import log_line
    from lstm_dist.training.mfu import model_flops_utilization, peak_flops

    cfg = load(None, ["train.steps=640"])
    row = {"train/epoch": 0, "train/loss": 1.25, "train/bpb": 1.8034, "train/lr": 0.02, "train/grad_norm": 0.5,
           "perf/chars_per_s": 4.2e6, "perf/chars_per_s_per_process": 5.25e5, "perf/elapsed_s": 4.9,
           "perf/max_memory_gib": 3.21}
    assert log_line(10, cfg, "bpb", row, "GPU", 297.0) == (
        "step 10/640 | loss 1.2500 | bpb 1.8034 | lr 0.0200 | 4.20M chars/s (525k/GPU) | mem 3.2 GiB | "
        "4.9s elapsed, ETA 4m57s")
    m = cfg.model
    mfu = model_flops_utilization(4.2e6, training_flops_per_token(m.embedding, m.hidden, m.layers, 256), 8,
                                  peak_flops("NVIDIA H200", "bf16"))
    line = log_line(10, cfg, "bpb", {**row, "perf/mfu": mfu}, "GPU", 297.0)
    assert f"(525k/GPU) | MFU {100 * mfu:.1f}% | mem 3.2 GiB |" in line and 0 < mfu < 1, line
