"""The learning-rate rule: the peak rate a run gets for its global batch, width and depth, and where
a user sees it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lstm_dist import config as C
from lstm_dist import lr_rule
from lstm_dist.errors import UserError
from lstm_dist.train import lr_at

from conftest import ROOT


def cfg(*overrides: str) -> C.Config:
    return C.load(None, ["train.lr=0.004", "train.lr_ref_batch=32", "train.lr_ref_hidden=256", *overrides])


@pytest.mark.parametrize("world, batch, hidden, layers, expected", [
    (1, 32, 256, 1, 0.004),     # the reference shape: train.lr as written
    (1, 8, 256, 1, 0.002),      # a quarter of the streams: half the rate
    (2, 64, 256, 1, 0.008),     # 128 streams over 2 processes: twice the rate
    (1, 128, 256, 1, 0.008),    # ... the same global batch in one process: the same rate
    (1, 32, 128, 1, 0.008),     # half as wide: twice the rate
    (1, 32, 256, 2, 0.002),     # two layers: half the rate
    (16, 128, 2048, 2, 0.004 * 8 / 8 / 2),   # 2,048 streams, 2 × 2048: × 8 for the batch, ÷ 8 for the width, ÷ 2
])
def test_sqrt_rule(world, batch, hidden, layers, expected):
    c = cfg(f"train.batch_size={batch}", f"model.hidden={hidden}", f"model.layers={layers}")
    assert lr_rule.global_batch(c, world) == world * batch
    assert lr_rule.peak_lr(c, world) == pytest.approx(expected)


def test_linear_and_none_rules():
    c = cfg("train.lr_scaling=linear", "train.batch_size=64", "model.hidden=256", "model.layers=1")
    assert lr_rule.peak_lr(c, 2) == pytest.approx(0.016)
    c = cfg("train.lr_scaling=none", "train.batch_size=64", "model.hidden=64", "model.layers=3")
    assert lr_rule.peak_lr(c, 2) == pytest.approx(0.004)  # as written, whatever the shape


def test_the_defaults_give_train_lr_at_the_reference_shape_and_scale_from_there():
    d = C.Config()
    assert d.train.lr_scaling == "sqrt"
    ref = C.load(None, [f"train.batch_size={d.train.lr_ref_batch}", f"model.hidden={d.train.lr_ref_hidden}",
                        "model.layers=1"])
    assert lr_rule.peak_lr(ref, 1) == pytest.approx(d.train.lr)
    wide_batch = C.load(None, [f"train.batch_size={d.train.lr_ref_batch * 4}", f"model.hidden={d.train.lr_ref_hidden}",
                               "model.layers=1"])
    assert lr_rule.peak_lr(wide_batch, 1) == pytest.approx(2 * d.train.lr)


def test_schedule_follows_the_rules_peak():
    c = cfg("train.batch_size=128", "model.hidden=256", "model.layers=1", "train.warmup_steps=10",
            "train.steps=110", "train.min_lr_ratio=0.1")
    peak = lr_rule.peak_lr(c, 1)
    assert lr_at(5, c.train, peak) == pytest.approx(peak / 2)
    assert lr_at(10, c.train, peak) == pytest.approx(0.008)
    assert lr_at(110, c.train, peak) == pytest.approx(0.0008)


def test_explain_names_the_inputs():
    c = cfg("train.batch_size=64", "model.hidden=128", "model.layers=2")
    text = lr_rule.explain(c, 2)
    assert text.startswith("peak lr 0.008 = train.lr 0.004 × sqrt(128 / 32) streams × (256 / 128) units / 2 layers")
    c.train.lr_scaling = "none"
    assert lr_rule.explain(c, 2).startswith("peak lr 0.004")


def test_reference_shape_must_be_positive():
    with pytest.raises(UserError, match=r"train.lr_ref_batch must be > 0"):
        C.load(None, ["train.lr_ref_batch=0"])
    with pytest.raises(UserError, match=r"train.lr_ref_hidden must be > 0"):
        C.load(None, ["train.lr_ref_hidden=-1"])
    with pytest.raises(UserError, match=r"train.lr_scaling .* is not one of"):
        C.load(None, ["train.lr_scaling=cubic"])


def test_print_config_shows_the_rule_for_the_launch_world_size():
    env = dict(os.environ, WORLD_SIZE="4")
    proc = subprocess.run([sys.executable, "-m", "lstm_dist.train", "--print-config", "train.batch_size=32",
                           "train.lr=0.003", "train.lr_ref_batch=32", "train.lr_ref_hidden=256", "model.hidden=256",
                           "model.layers=1"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "lr_ref_batch: 32" in proc.stdout and "lr_scaling: sqrt" in proc.stdout
    assert "world_size=4" in proc.stdout and "peak lr 0.006 = train.lr 0.003 × sqrt(128 / 32)" in proc.stdout
