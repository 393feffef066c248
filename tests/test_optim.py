"""The optimizer and the learning-rate schedule: what each setting does to the weights, step by step."""

from __future__ import annotations

import pytest
import torch

from lstm_dist.config import TrainConfig
from lstm_dist.model import CharLSTM
from lstm_dist.optim import build_optimizer, lr_at, schedule_phrase, set_lr


def test_cosine_and_linear_warm_up_then_decay_to_the_floor():
    t = TrainConfig(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_at(s, t) for s in (1, 5, 10)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(60, t) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(35, t) == pytest.approx(0.1 + 0.45 * (1 + 2 ** -0.5))  # a quarter of the way: cos(pi/4)
    assert lr_at(110, t) == pytest.approx(0.1)
    t.schedule = "linear"
    assert lr_at(35, t) == pytest.approx(1.0 - 0.9 * 0.25)  # straight line, unlike the cosine
    assert lr_at(60, t) == pytest.approx(0.55) and lr_at(110, t) == pytest.approx(0.1)


def test_constant_holds_the_peak_after_warm_up_and_no_warm_up_starts_at_the_peak():
    t = TrainConfig(lr=0.3, warmup_steps=4, steps=100, min_lr_ratio=0.1, schedule="constant")
    assert lr_at(2, t) == pytest.approx(0.15)
    assert {lr_at(s, t) for s in (4, 5, 50, 100)} == {0.3}
    t.warmup_steps = 0
    assert lr_at(1, t) == 0.3


def _model() -> CharLSTM:
    torch.manual_seed(0)
    return CharLSTM(11, 4, 6, 2)


def _step_with_zero_gradients(opt: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()


def test_weight_decay_shrinks_the_matrices_only():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, TrainConfig(lr=0.1, weight_decay=0.5, optimizer="adamw"))
    _step_with_zero_gradients(opt, model)  # zero gradients: only the decoupled decay moves a weight
    decayed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert decayed == {"cells.0.weight_ih", "cells.0.weight_hh", "cells.1.weight_ih", "cells.1.weight_hh",
                       "head.weight"}  # not the biases, not the embedding
    for n in decayed:
        torch.testing.assert_close(dict(model.named_parameters())[n], before[n] * (1 - 0.1 * 0.5))


def test_sgd_has_momentum_beta1_and_l2_on_the_matrices():
    model = _model()
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = TrainConfig(lr=0.1, weight_decay=0.2, optimizer="sgd", beta1=0.5)
    opt = build_optimizer(model, t)
    assert isinstance(opt, torch.optim.SGD)
    grads = {n: torch.full_like(p, 0.3) for n, p in model.named_parameters()}
    for _ in range(2):
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
    for n, p in model.named_parameters():
        wd = 0.2 if n in ("cells.0.weight_ih", "cells.0.weight_hh", "cells.1.weight_ih", "cells.1.weight_hh",
                          "head.weight") else 0.0
        g1 = grads[n] + wd * p0[n]  # L2: the decay is part of the gradient
        p1 = p0[n] - 0.1 * g1
        g2 = grads[n] + wd * p1
        p2 = p1 - 0.1 * (0.5 * g1 + g2)  # momentum buffer: beta1 · previous + this gradient
        torch.testing.assert_close(p, p2, msg=n)


def test_set_lr_reaches_every_group():
    model = _model()
    opt = build_optimizer(model, TrainConfig(lr=0.1))
    set_lr(opt, 0.025)
    assert [g["lr"] for g in opt.param_groups] == [0.025, 0.025]


def test_the_schedule_is_described_as_it_runs():
    assert schedule_phrase(TrainConfig(warmup_steps=0, schedule="cosine", min_lr_ratio=0.1)) == \
        "warm-up 0 steps, cosine decay to 0.1 of it"
    # a constant schedule holds the peak: it has no floor to decay to (min_lr_ratio is not used)
    assert schedule_phrase(TrainConfig(warmup_steps=5, schedule="constant", min_lr_ratio=0.1)) == \
        "warm-up 5 steps, then constant"
