"""The optimizer and the learning-rate schedule: what each setting does to the weights, step by step."""

from __future__ import annotations

import pytest
import torch

from lstm_dist.config import TrainConfig
from lstm_dist.model.char_lstm import CharLSTM
from lstm_dist.training.optim import Schedule, build_optimizer, lr_at, schedule_phrase, set_lr
from lstm_dist.training.step import TrainingStep


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


def test_a_schedule_changed_on_resume_continues_from_the_rate_in_force_without_a_jump():
    # A finished 40-step cosine run extended to 80: it keeps its final rate (recomputing would jump to
    # 0.0301 at step 41, the case)...
    old = TrainConfig(lr=0.0566, steps=40, min_lr_ratio=0.1, schedule="cosine")
    new = TrainConfig(lr=0.0566, steps=80, min_lr_ratio=0.1, schedule="cosine")
    at40 = lr_at(40, old)
    assert lr_at(41, new) > 5 * at40
    s = Schedule(new, new.lr, anchor=(40, at40 / old.lr))
    assert [s.lr(k) for k in (41, 60, 80)] == pytest.approx([at40] * 3)
    # ...a run lengthened half way stretches the rest of its decay: continuous at the resume step,
    # falling, and at the floor at its new end...
    a = lr_at(500, TrainConfig(lr=1.0, steps=1000))
    s = Schedule(TrainConfig(lr=1.0, steps=2000), 1.0, anchor=(500, a))
    rates = [s.lr(k) for k in range(500, 2001)]
    assert rates[0] == a and 0 < a - rates[1] < a - lr_at(501, TrainConfig(lr=1.0, steps=1000))  # a gentler step
    assert all(x >= y for x, y in zip(rates, rates[1:])) and rates[-1] == pytest.approx(0.1)
    # ...one resumed during warm-up warms up on to the peak
    s = Schedule(TrainConfig(lr=2.0, steps=100, warmup_steps=10), 2.0, anchor=(4, 0.2))
    assert [s.lr(k) for k in (4, 7, 10)] == pytest.approx([0.4, 1.2, 2.0]) and s.lr(100) == pytest.approx(0.2)
    # and with no anchor it is lr_at exactly (an unchanged resume stays bit for bit)
    t = TrainConfig(lr=0.3, steps=50, warmup_steps=5)
    assert [Schedule(t, 0.3).lr(k) for k in range(1, 51)] == [lr_at(k, t) for k in range(1, 51)]
    s = Schedule(t, 0.3, anchor=(7, 0.25))
    back = Schedule(t, 0.3)
    back.load_state_dict(s.state_dict())
    assert back.anchor == (7, 0.25) and back.shape() == s.shape()
    # a new train.lr scales the rate from the next step on (a lower rate after a divergence is a lower rate)
    old = Schedule(TrainConfig(lr=0.02, steps=100), 0.02)
    lower = Schedule(TrainConfig(lr=0.005, steps=100), 0.005)
    lower.continued(50, old)
    assert lower.lr(51) == pytest.approx(old.lr(51) / 4) and lower.lr(100) == pytest.approx(0.0005)


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


def test_set_lr_reaches_every_group_in_place_and_after_a_load():
    """AdamW's rate is a 0-d tensor on the parameters' device, written in place (the step reads nothing
    the host sets); a state_dict loaded from a file puts a float or CPU tensor back, and the next
    set_lr makes it a device tensor again. SGD (fused, float rates only) holds a float."""
    model = _model()
    opt = build_optimizer(model, TrainConfig(lr=0.1))
    assert all(g["fused"] for g in opt.param_groups)
    rates = [g["lr"] for g in opt.param_groups]
    set_lr(opt, 0.025)
    assert all(isinstance(r, torch.Tensor) and r.dim() == 0 and r.device == torch.device("cpu") for r in rates)
    assert [g["lr"] for g in opt.param_groups] == rates  # the same tensors, written in place
    assert [float(r) for r in rates] == [pytest.approx(0.025)] * 2
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"] = 0.5
    opt.load_state_dict(saved)
    set_lr(opt, 0.125)
    assert all(isinstance(g["lr"], torch.Tensor) and float(g["lr"]) == 0.125 for g in opt.param_groups)
    sgd = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1, beta1=0.9))
    set_lr(sgd, 0.25)
    assert [g["lr"] for g in sgd.param_groups] == [0.25, 0.25]
    assert all(torch.equal(sgd.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in model.parameters())


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_failed_verdict_skips_the_step_on_the_device(optimizer):
    """verdict() -> [mean loss, norm, failed]; apply(lr, failed=1) leaves the weights, the moments and
    AdamW's step count as they were and hands back a zero state; the next good step updates as usual.
    A loss above max_loss fails the step too; a finite one below it does not."""
    torch.manual_seed(0)
    model = _model()
    opt = build_optimizer(model, TrainConfig(optimizer=optimizer, beta1=0.9, lr=0.01))
    step = TrainingStep(model, model, opt, clip_norm=1.0, max_loss=100.0)
    x, y = torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (3, 5))
    record, state = step(x, y, None, 0.01)  # one good step: moments exist
    loss, norm, failed = record.tolist()
    assert record.dtype == torch.float64 and 0 < loss < 100 and norm > 0 and failed == 0.0
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    poisoned = step.forward_backward(x, y, state, poison=True)
    record = step.verdict(poisoned, step.clip())
    assert record[2].item() == 1.0 and not torch.isfinite(record[0])
    h, c = step.apply(0.01, record[2])
    assert all(torch.equal(p.detach(), weights[n]) and p.grad is None for n, p in model.named_parameters())
    for p in model.parameters():
        assert all(torch.equal(v, moments[id(p)][k]) for k, v in opt.state[p].items())
    assert not h.any() and not c.any()
    assert step(x, y, (h, c), 0.01)[0][2].item() == 0.0
    assert any(not torch.equal(p.detach(), weights[n]) for n, p in model.named_parameters())
    low = TrainingStep(model, model, opt, clip_norm=1.0, max_loss=0.5)  # every loss here is above 0.5 nats
    loss = low.forward_backward(x, y, None)
    assert low.verdict(loss, low.clip())[2].item() == 1.0
    low.discard()


def test_the_schedule_is_described_as_it_runs():
    assert schedule_phrase(TrainConfig(warmup_steps=0, schedule="cosine", min_lr_ratio=0.1)) == \
        "warm-up 0 steps, cosine decay to 0.1 of it"
    # a constant schedule holds the peak: it has no floor to decay to (min_lr_ratio is not used)
    assert schedule_phrase(TrainConfig(warmup_steps=5, schedule="constant", min_lr_ratio=0.1)) == \
        "warm-up 5 steps, then constant"


def test_the_training_step_clips_sets_the_rate_and_hands_back_a_detached_state():
    """The one step train, lr_find and bench run: the norm before clipping, the update of SGD at the
    rate given on the clipped gradient, the gradients gone, the next window's state cut from the graph;
    a discarded step leaves the weights as they were."""
    torch.manual_seed(0)
    model = _model()
    opt = build_optimizer(model, TrainConfig(optimizer="sgd", beta1=0.0, weight_decay=0.0, lr=1.0))
    step = TrainingStep(model, model, opt, clip_norm=1e-3)
    x, y = torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (3, 5))
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = step.forward_backward(x, y, None)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and not loss.requires_grad  # backward is done
    norm = float(step.clip())
    clipped = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert norm > 1e-2  # far above the limit: the gradients were scaled down to it
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in clipped.values()])) == pytest.approx(1e-3, rel=1e-4)
    h, c = step.apply(0.5)
    assert [float(g["lr"]) for g in opt.param_groups] == [0.5, 0.5]
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), p0[n] - 0.5 * clipped[n], msg=n)
        assert p.grad is None
    assert h.shape == c.shape == (2, 3, 6) and not h.requires_grad and not c.requires_grad
    # clip_norm 0: measured, not clipped; discard: no update, gradients gone
    step = TrainingStep(model, model, opt, clip_norm=0)
    p1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    step.forward_backward(x, y, (h, c))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert float(step.clip()) == pytest.approx(float(torch.stack([g.norm() for g in grads.values()]).norm()), rel=1e-5)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    step.discard()
    assert all(torch.equal(p.detach(), p1[n]) and p.grad is None for n, p in model.named_parameters())


@pytest.mark.parametrize("k", [2, 3, 6])
def test_k_micro_batches_accumulate_to_the_step_of_one_batch(k):
    """Gradient accumulation (train.global_batch_size): a window of 6 streams in k passes of 6 / k streams,
    each from its own slice of the carried state, gives one pass's mean loss, gradients, update and next
    state (to float summation order); a batch that k does not divide is refused."""
    x, y = torch.randint(0, 11, (6, 5)), torch.randint(0, 11, (6, 5))
    state = tuple(torch.randn(2, 6, 6) for _ in range(2))
    runs = {}
    for passes in (1, k):
        torch.manual_seed(0)
        model = _model()
        opt = build_optimizer(model, TrainConfig(optimizer="sgd", beta1=0.0, weight_decay=0.0, lr=1.0))
        step = TrainingStep(model, model, opt, clip_norm=0, micro_batches=passes)
        loss = step.forward_backward(x, y, state)
        grads = [p.grad.clone() for p in model.parameters()]
        runs[passes] = (loss, grads, step.apply(0.5), [p.detach().clone() for p in model.parameters()])
    (l1, g1, s1, w1), (lk, gk, sk, wk) = runs[1], runs[k]
    assert float(lk) == pytest.approx(float(l1), rel=1e-6)
    for a, b in zip(g1 + list(s1) + w1, gk + list(sk) + wk):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert sk[0].shape == (2, 6, 6)
    with pytest.raises(ValueError, match="does not split into 4 micro-batches"):
        TrainingStep(model, model, opt, clip_norm=0, micro_batches=4).forward_backward(x, y, state)
