"""Configuration: layering, strict validation with one-line errors, round trips, the reference in
docs/configuration.md, and the one place each setting's allowed values and default are read from.

The command line runs in this process (`main(argv)` under `run_cli`, as `python -m lstm_dist.config`
runs it); `test_the_real_command_line` runs the real `python -m` command, for its exit status and streams."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lstm_dist import config as C
from lstm_dist.common.errors import UserError, run_cli
from lstm_dist.config.__main__ import main
from lstm_dist.config.reference import field_docs, reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def run_config(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The real `python -m lstm_dist.config ARGS`."""
    return subprocess.run([sys.executable, "-m", "lstm_dist.config", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def _in_process(capsys, monkeypatch, entry, env_names):
    """An entry point's main run in this process, as `run(*args) -> (exit status, stdout, stderr)`, with
    `env_names` unset (errors print on rank 0, without a traceback)."""
    for name in env_names:
        monkeypatch.delenv(name, raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run_cli(entry, list(args))
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    return run


@pytest.fixture
def config_cli(capsys, monkeypatch):
    """`python -m lstm_dist.config ARGS` in this process: (exit status, stdout, stderr)."""
    return _in_process(capsys, monkeypatch, main, ("RANK", "LSTM_DIST_DEBUG"))


def test_defaults_yaml_then_overrides_win_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 7\n  bptt: 33\nmodel:\n  hidden: 64\nlog:\n  wandb:\n    mode: offline\n")
    cfg = C.load(f, ["train.steps=200", "model.dropout=0.25", "train.lr=3e-4", "run.name=0123"])
    assert cfg.train.steps == 200  # override beats file
    assert cfg.train.bptt == 33  # file beats default
    assert cfg.model.hidden == 64
    assert cfg.model.layers == C.ModelConfig().layers  # default kept
    assert cfg.model.dropout == 0.25 and isinstance(cfg.model.dropout, float)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.run.name == "0123"  # strings stay verbatim
    assert cfg.log.wandb.mode == "offline"


def test_saved_config_loads_back_equal(tmp_path):
    cfg = C.load(None, ["train.steps=9", "train.warmup_steps=3", "model.layers=3", "log.wandb.mode=disabled", "checkpoint.resume=never"])
    f = tmp_path / "config.yaml"
    f.write_text(cfg.to_yaml())
    assert C.load(f) == cfg
    assert C.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.bptt_len=3"], "unknown key 'train.bptt_len'; did you mean 'train.bptt'?"),
        (["model.hiden=3"], "unknown key 'model.hiden'; did you mean 'model.hidden'?"),
        (["bptt=3"], "unknown key 'bptt'; did you mean 'train.bptt'?"),
        (["train.batch_size=0"], "train.batch_size must be > 0, got 0"),
        (["train.batch_size=-4"], "train.batch_size must be > 0, got -4"),
        (["model.dropout=1.0"], "model.dropout must be in [0, 1), got 1.0"),
        (["model.dropout=-0.1"], "model.dropout must be in [0, 1), got -0.1"),
        (["train.steps=ten"], "train.steps (from the command line): expected an integer, got 'ten'"),
        (["train.lr=fast"], "train.lr (from the command line): expected a number, got 'fast'"),
        (["train.lr=nan"], "train.lr (from the command line): expected a finite number, got"),
        (["model.compile=maybe"], "model.compile (from the command line): expected true or false, got 'maybe'"),
        (["log.wandb.mode=cloud"], "log.wandb.mode (from the command line): 'cloud' is not one of 'auto', 'online', 'offline', 'disabled'"),
        (["log.eval_progress_every=-1"], "log.eval_progress_every must be >= 0 seconds (0 prints a line after every window), got -1"),
        (["train.steps"], "override 'train.steps' must look like section.key=value"),
        (["train=3"], "'train' is a section, not a setting"),
    ],
)
def test_each_bad_setting_is_one_line_and_exit_2(overrides, expected, config_cli):
    with pytest.raises(UserError) as info:
        C.load(None, overrides)
    assert str(info.value).startswith(expected)
    status, out, err = config_cli(*overrides)
    assert status == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: " + expected)
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train:\n  bptt_len: 3\n", "unknown key 'train.bptt_len'; did you mean 'train.bptt'?"),
        ("train:\n  steps: 1.5\n", "expected an integer, got 1.5"),
        ("model:\n  layers: true\n", "expected an integer, got True"),
        ("train: 5\n", "section 'train' must be a mapping"),
        ("train:\n  steps: [1\n", "is not valid YAML at line"),
        ("- a\n- b\n", "the top level must be a mapping"),
    ],
)
def test_bad_yaml_files_are_one_line(tmp_path, text, expected, config_cli):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    status, _, err = config_cli("--config", str(f))
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    assert expected in err


def test_missing_config_file_names_it(tmp_path, config_cli):
    status, _, err = config_cli("--config", str(tmp_path / "nope.yaml"))
    assert status == 2
    assert f"config file {tmp_path / 'nope.yaml'} not found" in err


def test_the_real_command_line(tmp_path):
    """`python -m lstm_dist.config`: the resolved config as YAML that loads back (exit 0); a bad setting
    is one line on stderr and exit 2, without a traceback."""
    proc = run_config("train.steps=42", "train.warmup_steps=10", "model.hidden=96")
    assert proc.returncode == 0, proc.stderr
    f = tmp_path / "printed.yaml"
    f.write_text(proc.stdout)
    cfg = C.load(f)
    assert cfg.train.steps == 42 and cfg.model.hidden == 96
    bad = run_config("model.hiden=3")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["error: unknown key 'model.hiden'; did you mean 'model.hidden'?"]


def test_every_field_is_documented_and_checked_configs_load():
    docs = field_docs()
    assert set(C.leaf_fields()) <= set(docs)
    assert all(len(d) > 10 for d in docs.values())
    for f in sorted((ROOT / "configs").glob("*.yaml")):
        C.load(f)  # every shipped config is valid


def test_docs_configuration_reference_matches_the_dataclasses():
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert reference_markdown() in page, (
        "docs/configuration.md is out of date: paste `python -m lstm_dist.config --reference` into it")


def test_reference_flag_prints_the_table(config_cli):
    status, out, _ = config_cli("--reference")
    assert status == 0 and out == reference_markdown()


def test_choices_and_checks_read_the_one_rule_of_a_setting():
    """`choices` gives a Literal setting's values in the declared order; `check_setting` applies type
    then range as a load does; `check_option` applies the same range to a command-line option, naming it."""
    assert C.choices("train.device") == ("auto", "cpu", "cuda")
    assert C.choices("log.wandb.mode") == ("auto", "online", "offline", "disabled")
    with pytest.raises(TypeError):
        C.choices("train.bptt")
    with pytest.raises(KeyError):
        C.choices("train.nope")
    assert C.check_setting("model.hidden", "64", "the test") == 64  # text parsed as a load parses it
    with pytest.raises(UserError, match=r"^model.hidden must be > 0, got 0$"):
        C.check_setting("model.hidden", 0)
    with pytest.raises(UserError, match=r"model.impl \(from the code\): 'fused' is not one of 'fast', 'reference'"):
        C.check_setting("model.impl", "fused")
    assert C.check_option("train.threads", 0, "--threads") == 0
    with pytest.raises(UserError) as info:
        C.check_option("train.threads", -1, "--threads")
    assert str(info.value) == "--threads must be >= 0 (0 divides the cores among the local processes), got -1"
    with pytest.raises(KeyError):
        C.check_option("train.device", "cpu", "--device")  # no range rule: a choice is checked by its values


def test_consumers_read_allowed_values_and_defaults_from_the_config():
    """No copy of a setting's values or default outside the config: the command-line tools offer
    `train.device`'s values, and the defaults of the code that stands for a setting are its default."""
    import inspect

    from lstm_dist.common import distributed
    from lstm_dist.data import corpus, prepare
    from lstm_dist.evaluate import build_parser as evaluate_parser
    from lstm_dist.generate import build_parser as generate_parser
    from lstm_dist.training.metrics import MODES, Metrics

    for parser in (evaluate_parser(), generate_parser()):
        device = next(a for a in parser._actions if a.dest == "device")
        assert tuple(device.choices) == C.choices("train.device") and device.default == C.TrainConfig().device
    assert distributed.DEVICES == C.choices("train.device")
    assert MODES == C.choices("log.wandb.mode") and corpus.VOCABS == C.choices("data.vocab")
    assert corpus.DEFAULT_DIRS["stdlib-docs"] == C.DataConfig().path
    defaults = {k: p.default for k, p in inspect.signature(Metrics).parameters.items()}
    w = C.WandbConfig()
    assert (defaults["wandb_mode"], defaults["project"], defaults["init_timeout"]) == (w.mode, w.project, w.init_timeout)
    assert inspect.signature(prepare.prepare).parameters["vocab"].default == C.DataConfig().vocab
    setup = inspect.signature(distributed.setup.__wrapped__).parameters
    assert setup["timeout_minutes"].default * 60 == C.TrainConfig().collective_timeout
    assert setup["device_preference"].default == C.TrainConfig().device


def test_the_config_imports_nothing_of_the_rest_of_the_package():
    """Every layer reads the config, so it may read none of them (no import cycle): its modules import
    only `lstm_dist.common.errors` and each other."""
    import ast

    for path in sorted((ROOT / "lstm_dist" / "config").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.startswith("lstm_dist"):
                    assert name == "lstm_dist.common.errors" or name.startswith("lstm_dist.config"), (path.name, name)


# ------------------------------------------------------------------ settings on the command line (issue 21)


@pytest.fixture
def train_cli(capsys, monkeypatch):
    """`python -m lstm_dist.train ARGS` in this process: (exit status, stdout, stderr), for what happens
    before training starts (help, refused arguments)."""
    from lstm_dist.train import main as train_main

    return _in_process(capsys, monkeypatch, train_main, ("RANK", "LSTM_DIST_DEBUG", "LSTM_DIST_EXIT_FILE"))


def test_train_help_names_where_every_setting_is_listed(train_cli):
    status, out, err = train_cli("--help")
    assert status == 0 and err == ""
    assert "section.key=value" in out and "--config FILE" in out
    assert "every key, with its type, default and meaning: docs/configuration.md" in out
    assert "python -m lstm_dist.config --reference" in out
    assert (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8").startswith("# Configuration reference\n")
    assert "--train.steps 50 is refused" in out  # the one way settings are written, said where users look


@pytest.mark.parametrize("argv, expected", [
    (["--train.steps", "50"],
     "error: --train.steps 50 is written train.steps=50 here: settings are written section.key=value, without dashes"),
    (["--train.steps=50"],
     "error: --train.steps=50 is written train.steps=50 here: settings are written section.key=value, without dashes"),
    (["--train.step", "50"],
     "error: unknown key 'train.step' in --train.step 50; did you mean train.steps=50? "
     "(settings are written section.key=value, without dashes)"),
    (["--config", "configs/smoke.yaml", "--model.hiden=8"],
     "error: unknown key 'model.hiden' in --model.hiden=8; did you mean model.hidden=8? "
     "(settings are written section.key=value, without dashes)"),
    (["--train.batch-size", "4"],
     "error: --train.batch-size 4 is written train.batch_size=4 here: settings are written section.key=value, without dashes"),
    (["--model.compile", "train.steps=3"],
     "error: --model.compile is written model.compile=true here: settings are written section.key=value, without dashes"),
    (["--nope.x", "1"],
     "error: unknown key 'nope.x' in --nope.x 1; valid sections are 'run', 'data', 'model', 'train', 'log', "
     "'checkpoint' (settings are written section.key=value, without dashes)"),
])
def test_a_setting_written_as_an_option_gets_the_spelling_to_use(argv, expected, train_cli, config_cli):
    # torchtitan's `--section.key value`: refused in one line with the `section.key=value` to write (and
    # the did-you-mean of an unknown key), by train and by every entry point that takes settings
    for cli in (train_cli, config_cli):
        status, out, err = cli(*argv)
        assert (status, out) == (2, "") and err.strip().splitlines() == [expected], err
    assert C.dashed_setting(["train.steps=50", "--config", "x.yaml", "--print-config"]) is None  # nothing dashed
