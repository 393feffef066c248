"""CUDA graphs over the time loops (`lstm_dist.model.graphs`), their bookkeeping tested on the CPU.

No graph exists on the CPU: with `Kernels(force=True)` the same bookkeeping runs, and a "replay" runs
the recorded closure again on the same static buffers, which is what a graph's replay computes. So
what is tested here is everything but the driver: which set a window takes, that its buffers keep
their addresses from window to window, one set per layer and key, no set for a window without autograd
history or beyond `MAX_SETS`, that a set is never handed out while a window holds it, the copies in and
out (U, dy, dc), the counts of warm-up windows, captures and replays, and that a failed capture leaves
the numbers as they were. On a GPU, `tests/test_train_cuda.py` (`-m cuda`) captures for real.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lstm_dist.model import graphs
from lstm_dist.model.char_lstm import CharLSTM, detach_state
from lstm_dist.model.fast import lstm_layer_fast
from lstm_dist.model.kernels import KERNELS, Kernels
from test_model import BATCH, BPTT, EMB, HID, VOCAB, TorchCharLSTM, kernels_here, rel_err, two_windows

GRAPHED_ENTRIES = [n for n, spec in KERNELS.items() if spec.forward_loop is not None and "cuda" in spec.devices]


@pytest.fixture(autouse=True)
def fresh_sets():
    """Every test starts and ends with no set and no recorded failure."""
    graphs.clear()
    yield
    graphs.clear()
    graphs._FAILURE = None


def train_windows(net: CharLSTM, windows: int, seed: int = 0, batch: int = BATCH, bptt: int = BPTT):
    """`windows` truncated-BPTT windows with an SGD step after each (so U changes between windows, and a
    graph reading a stale copy would show): the logits and every gradient of each window."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    state, seen = None, []
    for _ in range(windows):
        x = torch.randint(0, VOCAB, (batch, bptt + 1), generator=g)
        logits, state = net(x[:, :-1], state)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1)) + 0.1 * state[1].sin().sum()
        opt.zero_grad()
        loss.backward()
        seen.append([logits.detach().clone()] + [p.grad.clone() for p in net.parameters()])
        opt.step()
        state = detach_state(state)
    return seen


def twin(kernels: Kernels, layers: int = 2, seed: int = 0):
    """The same model twice: with `kernels`, and with the same kernels without graphs."""
    torch.manual_seed(seed)
    a = CharLSTM(VOCAB, EMB, HID, layers, kernels=kernels)
    b = CharLSTM(VOCAB, EMB, HID, layers, kernels=dataclasses.replace(kernels, graphs=False))
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("name", GRAPHED_ENTRIES)
def test_graphed_windows_compute_what_the_same_loops_compute_without_graphs(name):
    """Six windows through 2 layers: warm-up (2), capture (1), replays (3), each direction, one set per
    layer whose buffers keep their addresses; every window's logits and gradients equal, bit for bit."""
    kernels = dataclasses.replace(kernels_here(name), force=True, graphs=True)
    graphed, plain = twin(kernels)
    addresses = []
    original_take = graphs.SETS.take

    def take(*args):
        s = original_take(*args)
        addresses.append(None if s is None else (s.gates.data_ptr(), s.hs.data_ptr(), s.cs.data_ptr()))
        return s

    graphs.SETS.take = take
    try:
        got = train_windows(graphed, 6)
    finally:
        del graphs.SETS.take
    want = train_windows(plain, 6)
    for window, (a, b) in enumerate(zip(got, want)):
        for k, (u, v) in enumerate(zip(a, b)):
            assert torch.equal(u, v), (window, k, rel_err(u, v))
    sets = graphs.SETS.all()
    assert len(sets) == 2  # one per layer
    assert addresses == [(s.gates.data_ptr(), s.hs.data_ptr(), s.cs.data_ptr()) for s in sets] * 6
    for s in sets:
        for phase in (s.forward_phase, s.backward_phase):
            assert (phase.warmed, phase.captured, phase.replayed) == (graphs.WARMUP, 1, 6 - graphs.WARMUP)
    assert kernels.runs_graphs() and kernels.describe().endswith(" in CUDA graphs")


@pytest.mark.parametrize("name", GRAPHED_ENTRIES)
def test_graphed_paths_keep_parity_with_torch_lstm_over_two_carried_windows(name):
    """The parity test of the table's entries (`test_model`), with graphs, repeated until its windows
    replay recorded loops: two windows whose state is carried (not detached), 3 layers, every output
    and gradient against torch.nn.LSTM."""
    kernels = dataclasses.replace(kernels_here(name), force=True, graphs=True)
    torch.manual_seed(3)
    ours = CharLSTM(VOCAB, EMB, HID, 3, kernels=kernels)
    with torch.no_grad():
        for cell in ours.cells:
            cell.bias.normal_(0, 0.5)
    theirs = TorchCharLSTM(ours)
    for attempt in range(graphs.WARMUP + 2):
        x = torch.randint(0, VOCAB, (BATCH, 2 * BPTT + 1))
        h0, c0 = torch.randn(3, BATCH, HID), torch.randn(3, BATCH, HID)
        args = (x[:, :BPTT], x[:, 1 : BPTT + 1], x[:, BPTT : 2 * BPTT], x[:, BPTT + 1 :], h0, c0)
        ours.zero_grad()
        theirs.zero_grad()
        a, b = two_windows(ours, *args), two_windows(theirs, *args)
        flat = lambda r: [r[0], r[1], *r[2], *r[3], r[4], r[5]]  # noqa: E731
        for u, v in zip(flat(a), flat(b)):
            assert rel_err(u, v) < 1e-5, (attempt, rel_err(u, v))
        ref = theirs.grads(3)
        for key, p in ours.named_parameters():
            assert rel_err(p.grad, ref[key]) < 1e-5, (attempt, key)
    # both windows of each layer are alive until the one backward: two sets per layer
    sets = graphs.SETS.all()
    assert len(sets) == 6
    assert all(s.backward_phase.replayed == 2 for s in sets)


def test_a_set_held_by_a_window_is_never_handed_out_again():
    """A window's output (a view of its set's hs) kept past the next window: the next window takes a
    second set, and the kept output is unchanged; once released, the first set is taken again."""
    kernels = Kernels("eager", force=True, graphs=True)
    g = torch.Generator().manual_seed(0)
    w, u, b = (torch.randn(4 * HID, EMB, generator=g) * 0.3).requires_grad_(), \
        (torch.randn(4 * HID, HID, generator=g) * 0.3).requires_grad_(), torch.zeros(4 * HID, requires_grad=True)
    h0 = torch.zeros(BATCH, HID)
    x1, x2 = torch.randn(BPTT, BATCH, EMB, generator=g), torch.randn(BPTT, BATCH, EMB, generator=g)
    y1, _, _ = lstm_layer_fast(x1, h0, h0, w, u, b, kernels)
    kept = y1.detach().clone()
    y2, _, _ = lstm_layer_fast(x2, h0, h0, w, u, b, kernels)
    assert graphs.SETS.count() == 2 and torch.equal(y1, kept)
    first, second = graphs.SETS.all()
    assert y1.data_ptr() == first.hs[1:].data_ptr() and y2.data_ptr() == second.hs[1:].data_ptr()
    del y1
    assert first.free() and not second.free()
    y3, _, _ = lstm_layer_fast(x1, h0, h0, w, u, b, kernels)
    assert y3.data_ptr() == first.hs[1:].data_ptr() and graphs.SETS.count() == 2
    assert torch.equal(y3, kept)  # the same window again: the same numbers, in the same buffers


def test_windows_without_history_other_keys_and_beyond_the_limit_take_no_set(monkeypatch):
    """An evaluation (no_grad) runs without a set; another batch is another key with its own set; past
    MAX_SETS or the memory budget a window runs as it would without graphs, with the same numbers."""
    kernels = Kernels("eager", force=True, graphs=True)
    graphed, plain = twin(kernels, layers=1)
    x = torch.randint(0, VOCAB, (BATCH, BPTT))
    with torch.no_grad():
        assert torch.equal(graphed(x)[0], plain(x)[0])
    assert graphs.SETS.count() == 0
    graphed(x)[0].sum().backward()
    graphed(torch.randint(0, VOCAB, (BATCH + 1, BPTT)))[0].sum().backward()
    assert sorted(s.key[2] for s in graphs.SETS.all()) == [BATCH, BATCH + 1]  # (device, T, B, ...)
    monkeypatch.setattr(graphs, "MAX_SETS", 2)
    x3 = torch.randint(0, VOCAB, (BATCH + 2, BPTT))
    out = graphed(x3)[0]
    assert graphs.SETS.count() == 2 and torch.equal(out, plain(x3)[0])
    # nor past the memory budget (a share of a GPU's memory; a fixed one for the CPU's stand-in)
    monkeypatch.setattr(graphs, "MAX_SETS", 16)
    monkeypatch.setattr(graphs, "CPU_BYTES", graphs.SETS.nbytes() + 1)
    graphed(x3)[0].sum().backward()
    assert graphs.SETS.count() == 2
    monkeypatch.setattr(graphs, "CPU_BYTES", 4 << 30)
    graphed(x3)[0].sum().backward()
    assert graphs.SETS.count() == 3
    # graphs off: no set, whatever the window (the default everywhere)
    plain(x)[0].sum().backward()
    assert graphs.SETS.count() == 3


class FailingCapture:
    """A driver whose capture raises (as `torch.cuda.graph` does on an op it cannot capture)."""

    def warm(self, fn, device):
        fn()

    def capture(self, fn, device):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


def test_a_failed_capture_is_recorded_and_the_same_numbers_follow_without_graphs(monkeypatch):
    monkeypatch.setitem(graphs._RECORDERS, "cpu", FailingCapture())
    kernels = Kernels("eager", force=True, graphs=True)
    graphed, plain = twin(kernels)
    got, want = train_windows(graphed, 4), train_windows(plain, 4)
    for a, b in zip(got, want):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert graphs.failure() == "RuntimeError: operation not permitted when stream is capturing"
    assert not kernels.runs_graphs() and graphs.SETS.count() == 0  # the sets were dropped; none made since



def test_a_capture_failing_mid_run_is_agreed_at_the_next_log_step_and_said_once(tmp_path, tiny_corpus, monkeypatch,
                                                                               capsys):
    """A capture recorded as failed in step 3 (as `graphs` records a real one): at the next log step (4)
    the ranks agree on it (here a world of one in a gloo group) and rank 0 says it once; the run goes on."""
    from lstm_dist.common import faults
    from lstm_dist.common.distributed import setup
    from lstm_dist.training.loop import Trainer
    from lstm_dist.training.stopping import Preemption
    from test_host_sync import build

    monkeypatch.setenv("LSTM_DIST_FAULT", "graphs-fail-later:step=3")
    faults._spec.cache_clear()
    try:
        cfg = build(tmp_path, tiny_corpus, monkeypatch, "train.steps=8", "train.eval_every=0")
        with setup(cfg.train.device) as env:
            trainer = Trainer(cfg, env)
            try:
                assert trainer.run(Preemption()) == 0
            finally:
                trainer.close()
    finally:
        monkeypatch.delenv("LSTM_DIST_FAULT")
        faults._spec.cache_clear()
    said = [line for line in capsys.readouterr().out.splitlines() if "CUDA graph" in line]
    assert said == [f"warning: a CUDA graph of the LSTM loops failed on rank 0 by step 4 (injected by "
                    f"LSTM_DIST_FAULT=graphs-fail-later at step 3); this run's kernels "
                    f"({trainer.kernels.describe()}) record no graphs (model.cuda_graphs=false skips them)"], said


@pytest.mark.cuda
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", GRAPHED_ENTRIES)
def test_on_cuda_graphed_windows_replay_what_the_loops_compute(name, bf16):
    """Real capture and replay on a GPU, each CUDA entry, fp32 and bf16 autocast: six windows of a 2-layer
    model (2 warm-up, 1 capture, 3 replays per set) against the same kernels without graphs; a replayed
    window synchronises nothing with the host."""
    dev = torch.device("cuda")
    spec = KERNELS[name]
    if spec.why_not is not None and (why := spec.why_not(dev, 8, 128)) is not None:
        pytest.skip(f"the {name} kernels cannot run here: {why}")
    kernels = Kernels(name, bf16=bf16, graphs=True)
    torch.manual_seed(0)
    graphed = CharLSTM(64, 32, 128, 2, kernels=kernels).to(dev)
    plain = CharLSTM(64, 32, 128, 2, kernels=dataclasses.replace(kernels, graphs=False)).to(dev)
    plain.load_state_dict(graphed.state_dict())
    g = torch.Generator(device="cpu").manual_seed(1)
    batches = [torch.randint(0, 64, (8, 17), generator=g).to(dev) for _ in range(6)]
    runs = []
    for net in (graphed, plain):
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        seen = []
        for k, x in enumerate(batches):
            torch.cuda.set_sync_debug_mode("error" if net is graphed and k > graphs.WARMUP else "default")
            try:
                with kernels.autocast():
                    logits, _ = net(x[:, :-1])
                loss = F.cross_entropy(logits.float().reshape(-1, 64), x[:, 1:].reshape(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            seen.append([logits.detach().float()] + [p.grad.clone() for p in net.parameters()])
        runs.append(seen)
    assert graphs.failure() is None and kernels.runs_graphs()
    sets = graphs.SETS.all()
    assert len(sets) == 2
    for s in sets:
        for phase in (s.forward_phase, s.backward_phase):
            assert (phase.warmed, phase.captured, phase.replayed) == (graphs.WARMUP, 1, 6 - graphs.WARMUP)
    for k, (a, b) in enumerate(zip(*runs)):
        for u, v in zip(a, b):
            assert rel_err(u, v) < 1e-4, (k, rel_err(u, v))


def test_the_start_up_probe_replays_a_window_and_leaves_nothing_behind(monkeypatch):
    """What `choose_kernels` asks each rank on CUDA (here with the CPU's stand-in): None where a window
    captures and its replay matches; the capture's error where it fails; no set and no recorded failure
    left behind either way."""
    kernels = Kernels("eager", force=True, graphs=True)
    cpu = torch.device("cpu")
    assert graphs.probe(cpu, BATCH, HID, kernels) is None
    assert graphs.probe(cpu, BATCH, HID, Kernels("eager", graphs=True)) == "CUDA graphs need CUDA"
    monkeypatch.setitem(graphs._RECORDERS, "cpu", FailingCapture())
    assert graphs.probe(cpu, BATCH, HID, kernels) == "RuntimeError: operation not permitted when stream is capturing"
    assert graphs.failure() is None and graphs.SETS.count() == 0


def test_the_setting_is_said_to_apply_on_cuda_only_on_the_cpu():
    from lstm_dist.config import ModelConfig
    from lstm_dist.model.kernels import NOTE_GRAPHS_ON_CPU, choose_kernels

    said = []
    k = choose_kernels(ModelConfig(hidden=HID, cuda_graphs=True), "auto", torch.device("cpu"), batch=BATCH,
                       say=said.append)
    assert NOTE_GRAPHS_ON_CPU in said and not k.graphs and "graphs" not in k.describe()
    said.clear()
    choose_kernels(ModelConfig(hidden=HID), "auto", torch.device("cpu"), batch=BATCH, say=said.append)
    assert NOTE_GRAPHS_ON_CPU not in said


def test_gradient_accumulation_replays_the_same_sets_and_numbers_as_without_graphs():
    """train.global_batch_size's micro-batches on the graphed path: each step runs two forward/backward passes
    of half the streams, one after the other, so each pass finds its layer's set free again (one set per
    layer for all passes and steps), and every step's loss, gradients and next state equal the same steps
    without graphs, bit for bit."""
    from lstm_dist.training.optim import build_optimizer
    from lstm_dist.training.step import TrainingStep
    from lstm_dist.config import TrainConfig

    kernels = dataclasses.replace(kernels_here("eager"), force=True, graphs=True)
    graphed, plain = twin(kernels)
    results = []
    for net in (graphed, plain):
        step = TrainingStep(net, net, build_optimizer(net, TrainConfig(optimizer="sgd", beta1=0.0, lr=0.5)), clip_norm=0,
                            micro_batches=2)
        g = torch.Generator().manual_seed(3)
        state, seen = None, []
        for _ in range(6):
            x = torch.randint(0, VOCAB, (2 * BATCH, BPTT + 1), generator=g)
            loss = step.forward_backward(x[:, :-1], x[:, 1:], state)
            seen.append([loss] + [p.grad.clone() for p in net.parameters()])
            state = step.apply(0.5)
            seen[-1] += list(state)
        results.append(seen)
    for window, (a, b) in enumerate(zip(*results)):
        for k, (u, v) in enumerate(zip(a, b)):
            assert torch.equal(u, v), (window, k, rel_err(u, v))
    sets = graphs.SETS.all()
    assert len(sets) == 2  # one per layer, shared by both passes of every step
    for s in sets:
        for phase in (s.forward_phase, s.backward_phase):
            assert (phase.warmed, phase.captured, phase.replayed) == (graphs.WARMUP, 1, 12 - graphs.WARMUP)
