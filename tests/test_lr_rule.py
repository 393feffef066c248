"""The learning-rate rule: the peak rate a run gets for its global batch, and where a user sees it."""

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


def train(**kw) -> C.TrainConfig:
    return C.TrainConfig(**kw)


@pytest.mark.parametrize("world, batch, expected", [
    (1, 32, 0.004),     # the reference batch: train.lr as written
    (1, 8, 0.002),      # a quarter of the streams: half the rate
    (2, 64, 0.008),     # 128 streams over 2 processes: twice the rate
    (1, 128, 0.008),    # ... the same global batch in one process: the same rate
    (16, 128, 0.032),   # 2,048 streams: 8 ×
])
def test_sqrt_rule_scales_the_rate_with_the_square_root_of_the_global_batch(world, batch, expected):
    t = train(lr=0.004, lr_ref_batch=32, lr_scaling="sqrt", batch_size=batch)
    assert lr_rule.global_batch(t, world) == world * batch
    assert lr_rule.peak_lr(t, world) == pytest.approx(expected)


def test_linear_and_none_rules():
    t = train(lr=0.004, lr_ref_batch=32, lr_scaling="linear", batch_size=64)
    assert lr_rule.peak_lr(t, 2) == pytest.approx(0.016)
    t.lr_scaling = "none"
    assert lr_rule.peak_lr(t, 2) == pytest.approx(0.004)
    assert lr_rule.peak_lr(t, 64) == pytest.approx(0.004)


def test_the_defaults_give_the_documented_rate_at_the_reference_batch_and_scale_from_there():
    t = C.TrainConfig()
    assert t.lr_scaling == "sqrt"
    ref = C.TrainConfig(batch_size=t.lr_ref_batch)
    assert lr_rule.peak_lr(ref, 1) == pytest.approx(t.lr)
    four = C.TrainConfig(batch_size=t.lr_ref_batch * 4)
    assert lr_rule.peak_lr(four, 1) == pytest.approx(2 * t.lr)


def test_schedule_follows_the_rules_peak():
    t = train(lr=0.004, lr_ref_batch=32, batch_size=128, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    peak = lr_rule.peak_lr(t, 1)
    assert lr_at(5, t, peak) == pytest.approx(peak / 2)
    assert lr_at(10, t, peak) == pytest.approx(0.008)
    assert lr_at(110, t, peak) == pytest.approx(0.0008)


def test_explain_names_the_inputs():
    t = train(lr=0.004, lr_ref_batch=32, batch_size=64)
    text = lr_rule.explain(t, 2)
    assert "peak lr 0.008" in text and "128 streams" in text and "lr_ref_batch 32" in text and "sqrt" in text
    t.lr_scaling = "none"
    assert lr_rule.explain(t, 2).startswith("peak lr 0.004")


def test_reference_batch_must_be_positive():
    with pytest.raises(UserError, match=r"train.lr_ref_batch must be > 0"):
        C.load(None, ["train.lr_ref_batch=0"])
    with pytest.raises(UserError, match=r"train.lr_scaling .* is not one of"):
        C.load(None, ["train.lr_scaling=cubic"])


def test_print_config_shows_the_rule_for_the_launch_world_size():
    env = dict(os.environ, WORLD_SIZE="4")
    proc = subprocess.run([sys.executable, "-m", "lstm_dist.train", "--print-config", "train.batch_size=32",
                           "train.lr=0.003", "train.lr_ref_batch=32"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "lr_ref_batch: 32" in proc.stdout and "lr_scaling: sqrt" in proc.stdout
    assert "world_size=4" in proc.stdout and "peak lr 0.006 = train.lr 0.003" in proc.stdout
    assert "128 streams" in proc.stdout
