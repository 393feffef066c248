"""Configuration: layering, strict validation with one-line errors, round trips, the README reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lstm_dist import config as C
from lstm_dist.config.reference import field_docs, reference_markdown
from lstm_dist.common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def run_config(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lstm_dist.config", *args], cwd=cwd, capture_output=True, text=True)


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
        (["train.steps"], "override 'train.steps' must look like section.key=value"),
        (["train=3"], "'train' is a section, not a setting"),
    ],
)
def test_each_bad_setting_is_one_line_and_exit_2(overrides, expected):
    with pytest.raises(UserError) as info:
        C.load(None, overrides)
    assert str(info.value).startswith(expected)
    proc = run_config(*overrides)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: " + expected)
    assert "Traceback" not in proc.stderr


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
def test_bad_yaml_files_are_one_line(tmp_path, text, expected):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    proc = run_config("--config", str(f))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert expected in proc.stderr


def test_missing_config_file_names_it(tmp_path):
    proc = run_config("--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert f"config file {tmp_path / 'nope.yaml'} not found" in proc.stderr


def test_print_config_is_loadable_yaml(tmp_path):
    proc = run_config("train.steps=42", "train.warmup_steps=10", "model.hidden=96")
    assert proc.returncode == 0, proc.stderr
    f = tmp_path / "printed.yaml"
    f.write_text(proc.stdout)
    cfg = C.load(f)
    assert cfg.train.steps == 42 and cfg.model.hidden == 96


def test_every_field_is_documented_and_checked_configs_load():
    docs = field_docs()
    assert set(C.leaf_fields()) <= set(docs)
    assert all(len(d) > 10 for d in docs.values())
    for f in sorted((ROOT / "configs").glob("*.yaml")):
        C.load(f)  # every shipped config is valid


def test_readme_reference_matches_the_dataclasses():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert reference_markdown() in readme, (
        "README's configuration reference is out of date: paste `python -m lstm_dist.config --reference` into it")
