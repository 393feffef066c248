"""A training step reads nothing back from the device between two log lines.

On CUDA a host read (`.item()`, `float(t)`, `.tolist()`, `if t:`, `torch.cuda.synchronize()`) makes the
CPU wait for the GPU: it can no longer queue the next step while this one runs, and no step can be
captured in a CUDA graph. The trainer keeps every per-step value on the device and reads them at the
steps it settles at (`Trainer.settles_at`: here the log steps). These tests run the real trainer in
this process and record every host read with the step and the code it came from.

On the CPU every value is already on the host, so nothing would wait; what is counted is what would
wait on CUDA: the ops that read a value (through the dispatcher: `_local_scalar_dense`, `item`,
`is_nonzero`, ...) and the tensor methods that do (`tolist`, `numpy`, `__bool__`, `__float__`, ...,
through `__torch_function__`). On a GPU, `torch.cuda.set_sync_debug_mode("error")` makes any implicit
synchronisation between two log lines an error, and `torch.cuda.synchronize` is counted.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY, free_port
from test_fast_path import HOST_SYNC_OPS

from lstm_dist import config as config_mod
from lstm_dist.common.distributed import setup
from lstm_dist.training.loop import Trainer
from lstm_dist.training.step import TrainingStep
from lstm_dist.training.stopping import Preemption

READ_METHODS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__,
                torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__}
STEPS, EVERY = 12, 4


def where(trainer: Trainer) -> tuple[int, str]:
    """(the trainer's step, the innermost Trainer method on the stack: 'train_step', 'settle', or 'other')."""
    codes = {Trainer.train_step.__code__: "train_step", Trainer.settle.__code__: "settle"}
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code in codes:
            return trainer.progress.step, codes[frame.f_code]
        frame = frame.f_back
    return trainer.progress.step, "other"


class HostReads(TorchDispatchMode):
    """Every op that reads a tensor's value back to the host, with `where` it was called."""

    def __init__(self) -> None:
        super().__init__()
        self.trainer: Trainer | None = None
        self.reads: list[tuple[int, str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_SYNC_OPS and self.trainer is not None:
            self.reads.append((*where(self.trainer), str(func)))
        return func(*args, **(kwargs or {}))


class HostReadMethods(TorchFunctionMode):
    """The tensor methods that hand a value to Python (some read the data without a dispatched op)."""

    def __init__(self, log: HostReads) -> None:
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READ_METHODS and self.log.trainer is not None:
            self.log.reads.append((*where(self.log.trainer), func.__name__))
        return func(*args, **(kwargs or {}))


def build(tmp_path, corpus, monkeypatch, *extra: str):
    """A world of one in a gloo process group (so DDP and the loss's all-reduce run as on a cluster)."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return config_mod.load(None, [*TINY, f"data.path={corpus}", f"run.dir={tmp_path}", "run.name=sync",
                                  f"train.steps={STEPS}", f"log.every={EVERY}", "train.sample_chars=0",
                                  "checkpoint.every=0", *extra])


def run_recording(cfg) -> list[tuple[int, str, str]]:
    """Run the trainer to the end under both recorders; every host read (step, where, op)."""
    log = HostReads()
    with setup(cfg.train.device) as env:
        trainer = Trainer(cfg, env)
        try:
            with log, HostReadMethods(log):
                log.trainer = trainer
                assert trainer.run(Preemption()) == 0
                log.trainer = None
        finally:
            trainer.close()
    return log.reads


@pytest.mark.parametrize("layout", [(), ("train.global_batch_size=8", "train.batch_size=2")], ids=["one-pass", "accumulated"])
def test_between_two_log_lines_a_step_reads_nothing_back(tmp_path, tiny_corpus, monkeypatch, layout):
    """Steps 1..12 with a log line every 4: inside a step no host read at all, with one forward pass or
    with gradient accumulation (4 passes of 2 streams); the reads of the per-step values (and the agreement
    on a stop) happen in `settle`, at steps 4, 8 and 12 only."""
    reads = run_recording(build(tmp_path, tiny_corpus, monkeypatch, *layout))
    by_place = defaultdict(set)
    for step, place, _ in reads:
        by_place[place].add(step)
    assert "train_step" not in by_place, [r for r in reads if r[1] == "train_step"]
    assert by_place["settle"] == {4, 8, 12}
    # elsewhere: before the first step (the start line) and after the last (checkpoint, final evaluation)
    assert by_place["other"] <= {0, STEPS}, sorted(r for r in reads if r[1] == "other")


def test_the_recorders_catch_a_read_inside_the_step(tmp_path, tiny_corpus, monkeypatch):
    """The check above fails when a step reads its gradient norm back (what `float(norm)` in the
    loop did before): the recorders are not blind to it."""
    clip = TrainingStep.clip

    def clip_and_read(self):
        norm = clip(self)
        if float(norm) > 1e9:  # a host read, as the old loop's float(norm)
            pass
        return norm

    monkeypatch.setattr(TrainingStep, "clip", clip_and_read)
    reads = run_recording(build(tmp_path, tiny_corpus, monkeypatch, "train.steps=4", "train.eval_every=0"))
    inside = {(step, op) for step, place, op in reads if place == "train_step"}
    assert {step for step, _ in inside} == {0, 1, 2, 3}  # the step's number before it counts itself
    assert any("_local_scalar_dense" in op or op in ("item", "__float__") for _, op in inside)


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["steps", "graphs"])
def test_on_cuda_no_synchronisation_between_two_log_lines(tmp_path, tiny_corpus, monkeypatch, cuda_graphs):
    """The CUDA path (NCCL, compiled steps, bf16, and in CUDA graphs): from the first log line on, any
    implicit synchronisation outside `settle` is an error (`set_sync_debug_mode("error")`), and no
    explicit `torch.cuda.synchronize()` comes from a step."""
    # 24 steps, a log line every 12: DDP times (and waits for) its first 10 iterations whatever we do
    cfg = build(tmp_path, tiny_corpus, monkeypatch, "train.device=cuda", "train.precision=bf16", "model.compile=true",
                "train.steps=24", "log.every=12", f"model.cuda_graphs={str(cuda_graphs).lower()}")
    settle, synchronize = Trainer.settle, torch.cuda.synchronize
    explicit: list[int] = []
    settled: list[int] = []

    def settle_unguarded(self, *args):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return settle(self, *args)
        finally:
            settled.append(self.progress.step)
            if self.progress.step < self.cfg.train.steps:  # from the first settle on (compiled by then) to the last
                torch.cuda.set_sync_debug_mode("error")

    def counted(*args, **kwargs):
        if torch.cuda.get_sync_debug_mode() != 0:
            explicit.append(1)
        return synchronize(*args, **kwargs)

    monkeypatch.setattr(Trainer, "settle", settle_unguarded)
    monkeypatch.setattr(torch.cuda, "synchronize", counted)
    try:
        with setup(cfg.train.device) as env:
            trainer = Trainer(cfg, env)
            try:
                trainer.run(Preemption())
            finally:
                torch.cuda.set_sync_debug_mode(0)
                trainer.close()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert settled == [12, 24] and not explicit
    assert trainer.kernels.runs_graphs() == cuda_graphs  # graphs captured (by step 3) and kept
