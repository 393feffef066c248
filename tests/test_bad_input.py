"""Bad input (issue 11): every mistake a user can make ends in ONE line `error: <cause>; <fix>`, a
non-zero exit, no traceback, and leaves every file it could touch exactly as it was.

One table (`CASES`) drives it all. Each case runs a real entry point: the Python ones in this process
(`main(argv)` under `lstm_dist.common.errors.run_cli`, as `python -m` runs them, with stdout/stderr captured at
the file-descriptor level), the launch scripts as subprocesses. Before and after each case the names,
sizes and sha256 of every file under the directories it names (`watch`) are compared. The fixtures are
made once per module: tiny prepared corpora (bytes and chars vocabularies), one finished tiny run of
each made by the real trainer, and defective copies. The bad-input table of docs/faults.md lists
every case; a test keeps the two in step.

Two lines are not part of the error and are dropped before counting stderr lines, where a case says so:
the launch scripts echo the command they start (`+ torchrun ...`, by design), and a download prints its
progress (`downloading NAME: ...`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import re
import shutil
import socket
import sys
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, child_env, prepare_corpus, run_group

from lstm_dist.common.errors import run_cli  # the wrapper every `python -m lstm_dist.X` runs its main() in

SMOKE = str(ROOT / "configs" / "smoke.yaml")
ECHO = r"\+ torchrun .*"  # the launch scripts' echo of the command they start
PROGRESS = r"downloading wikitext-103-raw-v1\.zip: .*"  # download progress (a tiny file: one line)
NAME = "wikitext-103-raw-v1.zip"


@dataclass(frozen=True)
class Case:
    id: str
    cmd: str  # train | generate | evaluate | data | launch/torchrun.sh | launch/multinode.sh
    args: tuple[str, ...]  # {name} is replaced by the fixture path of that name
    expect: str  # a distinctive part of the one error line
    watch: tuple[str, ...] = ()  # fixture directories whose files must not change
    env: dict[str, str] = field(default_factory=dict)
    status: int = 2
    noise: str | None = None  # a regex of stderr lines that are not the error (see the module docstring)


def train(*args: str) -> tuple[str, ...]:
    """The trainer on the finished bytes run `runs/b` unless the case says otherwise (later overrides win)."""
    return ("--config", SMOKE, *TINY, "data.path={corpus_b}", "run.dir={runs}", "run.name=b", "train.steps=2", *args)


def launch(*args: str) -> tuple[str, ...]:
    return (SMOKE, *TINY, "data.path={corpus_b}", "run.dir={runs}", "run.name=b", "train.steps=2", *args)


RUNS = ("runs",)
CASES = [
    # ---------------------------------------------------------------- config
    Case("config-unknown-key", "train", train("model.hiden=8"),
         "error: unknown key 'model.hiden'; did you mean 'model.hidden'?", RUNS),
    Case("config-wrong-type", "train", train("train.steps=ten"),
         "error: train.steps (from the command line): expected an integer, got 'ten'", RUNS),
    Case("config-wrong-type-in-file", "train", ("--config", "{yaml_wrong_type}", "run.dir={runs}", "run.name=b"),
         "error: train.bptt (from {yaml_wrong_type}): expected an integer, got 'long'", RUNS),
    Case("config-out-of-range", "train", train("model.dropout=1.5"), "error: model.dropout must be in [0, 1), got 1.5", RUNS),
    Case("config-missing-file", "train", ("--config", "{work}/nope.yaml", "run.dir={runs}", "run.name=b"),
         "error: config file {work}/nope.yaml not found; pass an existing YAML file", RUNS),
    Case("config-yaml-syntax", "train", ("--config", "{yaml_syntax}", "run.dir={runs}", "run.name=b"),
         "error: config file {yaml_syntax} is not valid YAML at line 3, column 6: expected ',' or ']'", RUNS),
    Case("config-yaml-not-a-mapping", "train", ("--config", "{yaml_list}", "run.dir={runs}", "run.name=b"),
         "error: {yaml_list}: the top level must be a mapping of keys to values, got list", RUNS),
    Case("config-section-not-a-mapping", "train", ("--config", "{yaml_section}", "run.dir={runs}", "run.name=b"),
         "error: {yaml_section}: section 'train' must be a mapping of keys to values, got int", RUNS),
    Case("config-warmup-longer-than-run", "train", train("train.warmup_steps=5000", "train.steps=10"),
         "error: train.warmup_steps=5000 is longer than the run (train.steps=10)", RUNS),
    Case("config-global-batch-not-a-multiple", "train", train("train.global_batch_size=6", "train.batch_size=4"),
         "error: train.global_batch_size=6 streams cannot be split over 1 process(es) in forward passes of "
         "train.batch_size=4: it must be a multiple of 1 × 4 = 4; set train.batch_size=3 (streams per forward pass)",
         RUNS),
    Case("config-keep-zero", "train", train("checkpoint.keep=0"), "error: checkpoint.keep must be > 0, got 0", RUNS),
    Case("config-setting-as-option", "train", train("--train.step", "50"),
         "error: unknown key 'train.step' in --train.step 50; did you mean train.steps=50? (settings are written "
         "section.key=value, without dashes)", RUNS),
    # ---------------------------------------------------------------- data
    Case("data-missing-corpus", "train", train("data.path={work}/no-such-corpus"),
         "error: data.path {work}/no-such-corpus does not exist; prepare a corpus there first", RUNS),
    Case("data-empty-split-bin", "train", train("data.path={corpus_empty_valid}"),
         "error: {corpus_empty_valid}/valid.bin is empty; re-prepare with:", ("runs", "corpus_empty_valid")),
    Case("data-too-short-split", "train", train("data.path={corpus_short}"),
         "error: the split has 20 characters but world_size*batch*(bptt+1) + bptt-1 = 1*4*17 + 15 = 83 are needed",
         ("runs", "corpus_short")),
    Case("data-vocab-not-its-splits", "train", train("data.path={corpus_bad_vocab}"),
         "error: {corpus_bad_vocab}: vocab.json has 5 ids but the splits were encoded with", ("runs", "corpus_bad_vocab")),
    Case("data-truncated-train-bin", "train", train("data.path={corpus_truncated}"),
         "error: {corpus_truncated}/train.bin holds 999 uint8 tokens but meta.json says 1000", ("runs", "corpus_truncated")),
    Case("data-prepare-empty-split", "data",
         ("prepare", "--source", "files", "--train", "{src}/train.txt", "--valid", "{src}/empty.txt", "--test",
          "{src}/test.txt", "--out", "{outs}/corpus", "--force"),
         "error: the valid split ({src}/empty.txt) is empty; give a non-empty text for it", ("outs", "src")),
    Case("data-prepare-invalid-utf8-chars", "data",
         ("prepare", "--source", "files", "--vocab", "chars", "--train", "{src}/latin1.txt", "--valid", "{src}/test.txt",
          "--test", "{src}/test.txt", "--out", "{outs}/corpus", "--force"),
         "error: {src}/latin1.txt is not valid UTF-8 near byte 63; convert it to UTF-8 first", ("outs", "src")),
    Case("data-wikitext-zip-checksum", "data",
         ("prepare", "--source", "wikitext103", "--zip", "{zips}/" + NAME, "--out", "{outs}/corpus", "--force"),
         "but 91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794 was expected; use an intact", ("outs", "zips")),
    Case("data-wikitext-zip-missing-member", "data",
         ("prepare", "--source", "wikitext103", "--zip", "{zips}/partial.zip", "--sha256", "{partial_sha}",
          "--out", "{outs}/corpus", "--force"),
         "error: {zips}/partial.zip holds no wiki.test.raw; is it wikitext-103-raw-v1.zip", ("outs", "zips")),
    Case("data-download-checksum", "data",
         ("prepare", "--source", "wikitext103", "--url", "{url}", "--cache-dir", "{cache}", "--retries", "0",
          "--out", "{outs}/corpus", "--force"),
         "was expected; it was deleted; check --url and --sha256, then run again", ("outs", "cache"), noise=PROGRESS),
    Case("data-download-refused", "data",
         ("prepare", "--source", "wikitext103", "--url", "{dead_url}", "--cache-dir", "{cache}", "--retries", "0",
          "--out", "{outs}/corpus", "--force"),
         "error: cannot download {dead_url} ([Errno 111] Connection refused); check --url and the network",
         ("outs", "cache")),
    Case("data-cache-not-writable", "data",
         ("prepare", "--source", "wikitext103", "--url", "{dead_url}", "--cache-dir", "{zips}/{name}/cache",
          "--out", "{outs}/corpus", "--force"),
         "error: cannot create the cache directory {zips}/{name}/cache (Not a directory); pass --cache-dir",
         ("outs", "zips")),
    # ---------------------------------------------------------------- checkpoints
    Case("ckpt-other-shape-resume-path", "train", train("run.name=other", "model.hidden=48", "checkpoint.resume={runs}/b"),
         "error: checkpoint {runs}/b/checkpoints/step_00000002.pt is of another model (model.hidden=32, this run has 48)",
         RUNS),
    Case("ckpt-other-shape-auto-resume", "train", train("model.hidden=48"),
         "error: checkpoint {runs}/b/checkpoints/step_00000002.pt is of another model (model.hidden=32, this run has 48)",
         RUNS),
    Case("ckpt-other-vocabulary", "train", train("data.path={corpus_c}"),
         "error: checkpoint {runs}/b/checkpoints/step_00000002.pt was trained on another vocabulary than the corpus at",
         ("runs", "corpus_c")),
    Case("ckpt-other-vocabulary-evaluate", "evaluate", ("--checkpoint", "{runs}/b", "--data", "{corpus_c}"),
         "error: the corpus {corpus_c} has a chars vocabulary of 39 ids, not the one the checkpoint was trained on",
         ("runs", "corpus_c")),
    Case("ckpt-crafted-pickle-generate", "generate", ("--checkpoint", "{evil}/evil.pt"),
         "it holds objects other than tensors and plain values and was refused (it could run code", ("evil",)),
    Case("ckpt-crafted-pickle-resume", "train", train("run.name=victim", "checkpoint.resume={evil}/evil.pt"),
         "it holds objects other than tensors and plain values and was refused (it could run code", ("runs", "evil")),
    Case("ckpt-path-does-not-exist", "generate", ("--checkpoint", "{work}/nope.pt"),
         "error: checkpoint {work}/nope.pt does not exist; pass a checkpoint file or a run directory"),
    Case("ckpt-dir-without-checkpoint", "evaluate", ("--checkpoint", "{empty_run}"),
         "error: {empty_run} holds no checkpoints (no checkpoints/step_*.pt)", ("empty_run",)),
    Case("ckpt-latest-names-missing-file", "generate", ("--checkpoint", "{run_bad_latest}"),
         "error: {run_bad_latest}/checkpoints/latest names step_00000099.pt, which does not exist", ("run_bad_latest",)),
    # ---------------------------------------------------------------- generate and evaluate
    Case("gen-prompt-outside-vocabulary", "generate", ("--checkpoint", "{runs}/c", "--prompt", "naïve €"),
         "error: the prompt has 2 character(s) the checkpoint's chars vocabulary lacks: 'ï', '€'; remove or replace them",
         RUNS),
    Case("gen-empty-prompt-file", "generate", ("--checkpoint", "{runs}/b", "--prompt-file", "{src}/empty.txt"),
         "error: --prompt-file {src}/empty.txt is empty; the model needs at least one character", ("runs", "src")),
    Case("gen-negative-max-new-tokens", "generate", ("--checkpoint", "{runs}/b", "--max-new-tokens", "-5"),
         "error: --max-new-tokens must be >= 0, got -5", RUNS),
    Case("gen-negative-temperature", "generate", ("--checkpoint", "{runs}/b", "--temperature", "-0.5"),
         "error: --temperature must be a number >= 0 (0 is greedy), got -0.5", RUNS),
    Case("gen-negative-top-k", "generate", ("--checkpoint", "{runs}/b", "--top-k", "-1"),
         "error: --top-k must be >= 0 (0 keeps every character), got -1", RUNS),
    Case("gen-top-p-zero", "generate", ("--checkpoint", "{runs}/b", "--top-p", "0"),
         "error: --top-p must be in (0, 1] (1 keeps every character), got 0.0", RUNS),
    Case("gen-top-p-above-one", "generate", ("--checkpoint", "{runs}/b", "--top-p", "1.5"),
         "error: --top-p must be in (0, 1] (1 keeps every character), got 1.5", RUNS),
    Case("eval-split-does-not-exist", "evaluate", ("--checkpoint", "{runs}/b", "--split", "dev"),
         "error: argument --split: invalid choice: 'dev' (choose from", RUNS),
    Case("eval-text-shorter-than-a-pair", "evaluate", ("--checkpoint", "{runs}/b", "--text", "{src}/one.txt"),
         "error: --text {src}/one.txt has 1 token(s); at least 2 are needed", ("runs", "src")),
    # ---------------------------------------------------------------- launch
    Case("launch-streams-do-not-fit", "launch/torchrun.sh", launch("train.batch_size=64"),
         "error: the split has 1000 characters but world_size*batch*(bptt+1) + bptt-1 = 2*64*17 + 15 = 2191 are needed",
         RUNS, env={"NPROC_PER_NODE": "2"}, noise=ECHO),
    Case("launch-truncated-train-bin", "launch/torchrun.sh", launch("data.path={corpus_truncated}"),
         "error: {corpus_truncated}/train.bin holds 999 uint8 tokens but meta.json says 1000", ("runs", "corpus_truncated"),
         env={"NPROC_PER_NODE": "2"}, noise=ECHO),
    Case("launch-checkpoint-other-shape", "launch/torchrun.sh", launch("model.hidden=48"),
         "error: checkpoint {runs}/b/checkpoints/step_00000002.pt is of another model (model.hidden=32, this run has 48)",
         RUNS, env={"NPROC_PER_NODE": "2"}, noise=ECHO),
    Case("launch-nproc-not-a-number-torchrun", "launch/torchrun.sh", launch(),
         "error: NPROC_PER_NODE=two is not a number of processes per node; set NPROC_PER_NODE to a positive integer",
         RUNS, env={"NPROC_PER_NODE": "two"}),
    Case("launch-nproc-not-a-number-multinode", "launch/multinode.sh", launch(),
         "error: NPROC=1.5 is not a number of processes per node; set NPROC_PER_NODE to", RUNS,  # NPROC: the old name
         env={"NPROC": "1.5", "NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"}),
    Case("launch-missing-config-torchrun", "launch/torchrun.sh", ("{work}/nope.yaml",),
         "error: config file {work}/nope.yaml not found; pass one of configs/*.yaml", env={"NPROC_PER_NODE": "1"}),
    Case("launch-missing-config-multinode", "launch/multinode.sh", ("{work}/nope.yaml",),
         "error: config file {work}/nope.yaml not found; pass one of configs/*.yaml",
         env={"NPROC_PER_NODE": "1", "NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"}),
]

# These start torchrun with two workers: seconds each, not milliseconds.
SLOW = {"launch-streams-do-not-fit", "launch-truncated-train-bin", "launch-checkpoint-other-shape"}


# ------------------------------------------------------------------------------------------ running

# `python -m lstm_dist.data` runs the package's __main__ module (the others are modules of their own).
ENTRY_MODULES = {"data": "lstm_dist.data.__main__"}

_ENV_DROP = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "LSTM_DIST_EXIT_FILE", "LSTM_DIST_DEBUG", "LSTM_DIST_CACHE", "TORCHELASTIC_RUN_ID")


def run_in_process(cmd: str, argv: list[str], capfd, monkeypatch) -> tuple[int, str, str]:
    """`python -m lstm_dist.<cmd> argv` in this process: its main() under run_cli; (status, stdout, stderr)
    captured at the file-descriptor level, so that C++ warnings and the like would show too."""
    for name in _ENV_DROP:
        monkeypatch.delenv(name, raising=False)
    module = importlib.import_module(ENTRY_MODULES.get(cmd, f"lstm_dist.{cmd}"))
    threads = torch.get_num_threads()
    capfd.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(module.main, argv)
    finally:
        torch.set_num_threads(threads)  # the trainer sets its own; the rest of the session keeps ours
    code = exit_info.value.code
    out, err = capfd.readouterr()
    return (code if isinstance(code, int) else 1), out, err


def run_subprocess(cmd: str, argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    full = {k: v for k, v in child_env().items() if k not in _ENV_DROP}
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    full.update(env)
    exe = [str(ROOT / cmd)] if cmd.startswith("launch/") else [sys.executable, "-m", f"lstm_dist.{cmd}"]
    proc = run_group(exe + argv, cwd=cwd, env=full)
    return proc.returncode, proc.stdout, proc.stderr


def snapshot(root: Path) -> dict[str, tuple[int, str]] | None:
    """Every file and directory under `root`: relative name -> (size, sha256) (directories: (-1, ''))."""
    if not root.exists():
        return None
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = (-1, "") if p.is_dir() else (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


# ------------------------------------------------------------------------------------------ fixtures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _zip(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(f"wikitext-103-raw/{name}", data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Evil:
    """Unpickling this would run code: it writes the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Every fixture path by name, made once: corpora, two finished runs, defective copies, inputs."""
    w = tmp_path_factory.mktemp("bad_input")
    P: dict[str, Path | str] = {"work": w, "runs": w / "runs", "outs": w / "outs", "cache": w / "cache",
                                "src": w / "src", "zips": w / "zips", "evil": w / "evil", "name": NAME}
    for d in ("outs", "cache", "src", "zips", "evil"):
        P[d].mkdir()
    P["corpus_b"] = prepare_corpus(w / "corpus-b", vocab="bytes")
    P["corpus_c"] = prepare_corpus(w / "corpus-c", vocab="chars")
    P["corpus_short"] = prepare_corpus(w / "corpus-short", train_chars=20)

    # one finished run of each vocabulary, made by the real trainer (in this process: it is the same main())
    for name, corpus in (("b", P["corpus_b"]), ("c", P["corpus_c"])):
        argv = ["--config", SMOKE, *TINY, f"data.path={corpus}", f"run.dir={P['runs']}", f"run.name={name}",
                "train.steps=2"]
        threads = torch.get_num_threads()
        try:
            with pytest.raises(SystemExit) as done:
                run_cli(importlib.import_module("lstm_dist.train").main, argv)
        finally:
            torch.set_num_threads(threads)
        assert done.value.code == 0
        assert (P["runs"] / name / "checkpoints" / "step_00000002.pt").is_file()

    # defective copies
    def copy(src: Path, name: str) -> Path:
        dst = w / name
        shutil.copytree(src, dst)
        return dst

    P["corpus_empty_valid"] = copy(P["corpus_b"], "corpus-empty-valid")
    (P["corpus_empty_valid"] / "valid.bin").write_bytes(b"")
    P["corpus_truncated"] = copy(P["corpus_b"], "corpus-truncated")
    data = (P["corpus_truncated"] / "train.bin").read_bytes()
    (P["corpus_truncated"] / "train.bin").write_bytes(data[:-1])
    P["corpus_bad_vocab"] = copy(P["corpus_c"], "corpus-bad-vocab")  # a vocab.json of another corpus
    (P["corpus_bad_vocab"] / "vocab.json").write_text(json.dumps({"kind": "chars", "size": 5, "chars": "abcd",
                                                                  "unknown_id": 4}))
    P["run_bad_latest"] = copy(P["runs"] / "b", "run-bad-latest")
    (P["run_bad_latest"] / "checkpoints" / "latest").write_text("step_00000099.pt\n")
    P["empty_run"] = w / "empty-run"
    P["empty_run"].mkdir()
    (P["empty_run"] / "config.yaml").write_text("run:\n  name: empty-run\n")
    outs_corpus = copy(P["corpus_b"], "outs/corpus")  # an existing corpus that a failed `prepare --force` must keep
    assert outs_corpus == P["outs"] / "corpus"

    # inputs
    src = P["src"]
    (src / "train.txt").write_text("The river runs north to the old city. " * 30)
    (src / "test.txt").write_text("A short test text. " * 10)
    (src / "empty.txt").write_bytes(b"")
    (src / "one.txt").write_text("a")
    (src / "latin1.txt").write_bytes(b"hello " * 10 + "café".encode("latin-1") + b" and more\n")
    P["yaml_wrong_type"] = w / "wrong_type.yaml"
    P["yaml_wrong_type"].write_text("train:\n  steps: 2\n  bptt: long\n")
    P["yaml_syntax"] = w / "syntax.yaml"
    P["yaml_syntax"].write_text("train:\n  steps: [1, 2\nmodel:\n  hidden: 8\n")
    P["yaml_list"] = w / "list.yaml"
    P["yaml_list"].write_text("- train.steps=2\n- model.hidden=8\n")
    P["yaml_section"] = w / "section.yaml"
    P["yaml_section"].write_text("train: 5\n")
    torch.save({"format": 1, "model": _Evil(P["evil"] / "ran.txt")}, P["evil"] / "evil.pt")
    proof = w / "pickle-runs-it.txt"  # the payload is real: plain pickle runs it
    pickle.loads(pickle.dumps(_Evil(proof)))
    assert proof.read_text() == "ran"

    # WikiText archives: a well-formed one that is not the real release (wrong checksum), one missing a member
    members = {f"wiki.{s}.raw": f" = {s} = \n Some {s} text.\n".encode() * 20 for s in ("train", "valid", "test")}
    _zip(P["zips"] / NAME, members)
    P["partial_sha"] = _zip(P["zips"] / "partial.zip", {k: v for k, v in members.items() if "test" not in k})
    payload = (P["zips"] / NAME).read_bytes()

    class Handler(BaseHTTPRequestHandler):  # serves the wrong-checksum archive at any address
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    P["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/{NAME}"
    P["dead_url"] = f"http://127.0.0.1:{_free_port()}/{NAME}"  # a loopback port nothing listens on
    yield P
    httpd.shutdown()
    httpd.server_close()


def fill(text: str, P: dict) -> str:
    return text.format(**{k: str(v) for k, v in P.items()})


def error_line(status: int, out: str, err: str, case: Case) -> str:
    """The one line of a failed command, after checking status, line count and the absence of tracebacks."""
    assert status == case.status, err
    assert "Traceback" not in err and "Traceback" not in out, out + err
    lines = [line for line in err.splitlines() if not (case.noise and re.fullmatch(case.noise, line))]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------ the test


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.id in SLOW else [])
                                  for c in CASES])
def test_bad_input_ends_in_one_line_and_changes_nothing(case, paths, capfd, monkeypatch):
    P = paths
    argv = [fill(a, P) for a in case.args]
    before = {name: snapshot(Path(P[name])) for name in case.watch}
    assert all(v is not None for v in before.values()), before  # the fixture made what the case protects
    monkeypatch.chdir(P["work"])
    if case.cmd.startswith("launch/"):
        status, out, err = run_subprocess(case.cmd, argv, case.env, P["work"])
    else:
        status, out, err = run_in_process(case.cmd, argv, capfd, monkeypatch)
    line = error_line(status, out, err, case)
    assert fill(case.expect, P) in line
    for name in case.watch:
        assert snapshot(Path(P[name])) == before[name], f"{name} changed"
    assert not (P["evil"] / "ran.txt").exists()  # the crafted checkpoint never ran its code
    assert not (P["work"] / "runs" / "other").exists() and not (P["work"] / "runs" / "victim").exists()


def test_there_are_over_30_cases_and_docs_faults_lists_each():
    assert len(CASES) >= 33 and len({c.id for c in CASES}) == len(CASES)
    page = (ROOT / "docs" / "faults.md").read_text(encoding="utf-8")
    assert page.startswith("# Faults and bad input\n")
    assert "| fault | what happens, and what the user sees |" in page  # the faults a job meets, above
    assert "| case | what the user sees |" in page
    rows = [line for line in page.splitlines() if line.startswith("| ") and "`" in line]
    for c in CASES:
        assert sum(f"`{c.id}`" in row for row in rows) == 1, c.id
    assert "(docs/faults.md)" in (ROOT / "README.md").read_text(encoding="utf-8")  # README links it


# ------------------------------------------------------------------------------------------ the real processes


def test_the_real_entry_point_prints_the_same_line_and_a_traceback_only_under_lstm_dist_debug(paths, capfd, monkeypatch):
    """`python -m lstm_dist.train` as a user runs it: the same one line as in process, and nothing else
    (no warning printed while it starts); with LSTM_DIST_DEBUG=1 the traceback of the user error comes
    first, and the line is still the last (shown in process: the same main() under the same run_cli)."""
    case = next(c for c in CASES if c.id == "config-warmup-longer-than-run")
    argv = [fill(a, paths) for a in case.args]
    status, out, err = run_subprocess("train", argv, {}, paths["work"])
    assert fill(case.expect, paths) in error_line(status, out, err, case)
    monkeypatch.chdir(paths["work"])
    for name in _ENV_DROP:  # no launch environment: a plain run on rank 0
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LSTM_DIST_DEBUG", "1")
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(importlib.import_module("lstm_dist.train").main, argv)
    assert exit_info.value.code == 2
    lines = capfd.readouterr().err.strip().splitlines()
    err = "\n".join(lines)
    assert lines[0] == "Traceback (most recent call last):", err
    assert "lstm_dist/config/" in err and "UserError: train.warmup_steps=5000" in err
    assert lines[-1].startswith("error: ") and fill(case.expect, paths) in lines[-1]
    assert sum(line.startswith("error: ") for line in lines) == 1
