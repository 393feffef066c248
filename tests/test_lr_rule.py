"""The learning-rate rule: the peak rate a run gets for its global batch, width and depth, and where
a user sees it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lstm_dist import config as C
from lstm_dist.training import lr_rule
from lstm_dist.common.errors import UserError
from lstm_dist.training.optim import lr_at

from conftest import ROOT

# The rates the defaults give (docs/lr_sweep.md): a change of the defaults must change these on purpose.
EXPECTED = {"h128_l1": 0.02 * 2 ** 0.5, "h128_l2": 0.01 * 2 ** 0.5, "h64_l1": 0.04, "h64_l2": 0.02, "smoke": 0.02}


def cfg(*overrides: str) -> C.Config:
    """The rule with the square-root batch term and inverse width and depth terms, whatever the defaults."""
    return C.load(None, ["train.lr=0.004", "train.lr_scaling=rule", "train.lr_ref_batch=32", "train.lr_ref_hidden=256",
                         "train.lr_batch_exponent=0.5", "train.lr_width_exponent=1", "train.lr_depth_exponent=1",
                         *overrides])


@pytest.mark.parametrize("world, batch, hidden, layers, expected", [
    (1, 32, 256, 1, 0.004),     # the reference shape: train.lr as written
    (1, 8, 256, 1, 0.002),      # a quarter of the streams: half the rate
    (2, 64, 256, 1, 0.008),     # 128 streams over 2 processes: twice the rate
    (1, 128, 256, 1, 0.008),    # ... the same global batch in one process: the same rate
    (1, 32, 128, 1, 0.008),     # half as wide: twice the rate
    (1, 32, 256, 2, 0.002),     # two layers: half the rate
    (16, 128, 2048, 2, 0.004 * 8 / 8 / 2),   # 2,048 streams, 2 × 2048: × 8 for the batch, ÷ 8 for the width, ÷ 2
])
def test_rule_with_square_root_batch_and_inverse_width_and_depth(world, batch, hidden, layers, expected):
    c = cfg(f"train.batch_size={batch}", f"model.hidden={hidden}", f"model.layers={layers}")
    assert lr_rule.global_batch(c, world) == world * batch
    assert lr_rule.peak_lr(c, world) == pytest.approx(expected)


def test_each_exponent_is_its_own_setting():
    base = ["train.batch_size=128", "model.hidden=64", "model.layers=2"]
    assert lr_rule.peak_lr(cfg(*base, "train.lr_batch_exponent=1"), 1) == pytest.approx(0.004 * 4 * 4 / 2)
    assert lr_rule.peak_lr(cfg(*base, "train.lr_batch_exponent=0"), 1) == pytest.approx(0.004 * 4 / 2)
    assert lr_rule.peak_lr(cfg(*base, "train.lr_width_exponent=0"), 1) == pytest.approx(0.004 * 2 / 2)
    assert lr_rule.peak_lr(cfg(*base, "train.lr_depth_exponent=2"), 1) == pytest.approx(0.004 * 2 * 4 / 4)
    # none: as written, whatever the shape
    assert lr_rule.peak_lr(cfg(*base, "train.lr_scaling=none"), 8) == pytest.approx(0.004)


def test_the_defaults_give_train_lr_at_the_reference_shape():
    d = C.Config()
    assert d.train.lr_scaling == "rule"
    ref = C.load(None, [f"train.batch_size={d.train.lr_ref_batch}", f"model.hidden={d.train.lr_ref_hidden}",
                        "model.layers=1"])
    assert lr_rule.peak_lr(ref, 1) == pytest.approx(d.train.lr)
    assert lr_rule.peak_lr(ref, 4) == pytest.approx(d.train.lr * 4 ** d.train.lr_batch_exponent)


def test_the_defaults_rates_for_the_shapes_the_sweep_measured():
    # docs/lr_sweep.md: the rates the defaults give the grid's cells, the smoke run and the cluster config
    def rate(*o: str, world: int = 1) -> float:
        return lr_rule.peak_lr(C.load(None, list(o)), world)
    assert rate("model.hidden=128", "model.layers=1", "train.batch_size=128") == pytest.approx(EXPECTED["h128_l1"])
    assert rate("model.hidden=128", "model.layers=2", "train.batch_size=32") == pytest.approx(EXPECTED["h128_l2"])
    assert rate("model.hidden=64", "model.layers=1", "train.batch_size=8") == pytest.approx(EXPECTED["h64_l1"])
    assert rate("model.hidden=64", "model.layers=2", "train.batch_size=8") == pytest.approx(EXPECTED["h64_l2"])
    assert lr_rule.peak_lr(C.load(ROOT / "configs" / "smoke.yaml"), 2) == pytest.approx(EXPECTED["smoke"])


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
    assert text.startswith("peak lr 0.008 = train.lr 0.004 × (128 / 32 streams)^0.5 × (256 / 128 units)^1 / (2 layers)^1")
    c.train.lr_scaling = "none"
    assert lr_rule.explain(c, 2).startswith("peak lr 0.004")


def test_bad_rule_settings_name_the_key():
    with pytest.raises(UserError, match=r"train.lr_ref_batch must be > 0"):
        C.load(None, ["train.lr_ref_batch=0"])
    with pytest.raises(UserError, match=r"train.lr_ref_hidden must be > 0"):
        C.load(None, ["train.lr_ref_hidden=-1"])
    with pytest.raises(UserError, match=r"train.lr_batch_exponent must be in \[0, 1\]"):
        C.load(None, ["train.lr_batch_exponent=2"])
    with pytest.raises(UserError, match=r"train.lr_scaling .* is not one of"):
        C.load(None, ["train.lr_scaling=sqrt"])


def test_print_config_shows_the_rule_for_the_launch_world_size():
    env = dict(os.environ, WORLD_SIZE="4")
    proc = subprocess.run([sys.executable, "-m", "lstm_dist.train", "--print-config", "train.batch_size=32",
                           "train.lr=0.003", "train.lr_ref_batch=32", "train.lr_batch_exponent=0.5",
                           "train.lr_ref_hidden=256", "model.hidden=256", "model.layers=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "lr_ref_batch: 32" in proc.stdout and "lr_scaling: rule" in proc.stdout
    assert "world_size=4" in proc.stdout and "peak lr 0.006 = train.lr 0.003 × (128 / 32 streams)^0.5" in proc.stdout


def test_a_global_batch_gives_every_world_size_the_same_rate_and_splits_into_forward_passes():
    """train.global_batch_size fixes the global batch (and so the rule's rate) whatever the world size;
    each rank's share runs in passes of train.batch_size; a share the passes cannot split is one line."""
    from lstm_dist.common.errors import EveryRankError
    from lstm_dist.training.batching import batch_layout

    cfg = C.load(None, ["train.global_batch_size=64", "train.batch_size=8", "train.lr_batch_exponent=0.5"])
    assert {lr_rule.peak_lr(cfg, w) for w in (1, 2, 4, 8)} == {lr_rule.peak_lr(cfg, 1)}
    m = cfg.model
    assert lr_rule.peak_lr(cfg, 1) == pytest.approx(0.02 * (64 / 32) ** 0.5 * (256 / m.hidden) ** 0.5 / m.layers)
    layouts = {w: batch_layout(cfg.train, w) for w in (1, 2, 4, 8)}
    assert [(l.per_rank, l.accumulation) for l in layouts.values()] == [(64, 8), (32, 4), (16, 2), (8, 1)]
    assert layouts[2].describe() == "32 streams in 4 micro-batches of 8 (64 in all: train.global_batch_size)"
    assert layouts[8].describe() == "8 streams (64 in all: train.global_batch_size)"
    with pytest.raises(EveryRankError, match=r"train.global_batch_size=64 streams cannot be split over 16 process\(es\) "
                       r"in forward passes of train.batch_size=8: it must be a multiple of 16 × 8 = 128; set "
                       r"train.batch_size=4 \(streams per forward pass\)"):
        batch_layout(cfg.train, 16)
    with pytest.raises(EveryRankError, match="run on a number of processes that divides 64"):
        batch_layout(cfg.train, 3)
    # without it, today's meaning: batch_size streams per rank, one pass, the global batch world × batch_size
    plain = C.load(None, ["train.batch_size=8"])
    assert [(batch_layout(plain.train, w).global_batch, batch_layout(plain.train, w).accumulation) for w in (1, 4)] == [(8, 1), (32, 1)]
    assert batch_layout(plain.train, 4).describe() == "8 streams"
