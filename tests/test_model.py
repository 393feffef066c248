"""The LSTM: parity with torch.nn.LSTM, the hand-written backward, step(), rebuilding, precision."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lstm_dist.model import lstm as M
from lstm_dist.model.lstm import LSTMWindow, lstm_layer_fast, lstm_layer_reference
from lstm_dist.model.char_lstm import CharLSTM, LSTMLayer, detach_state

ROOT = Path(__file__).resolve().parents[1]
VOCAB, EMB, HID, BATCH, BPTT = 13, 6, 8, 3, 5


def _compile_works() -> bool:
    """Whether torch.compile of the pointwise step works here (tried once, on a tiny window)."""
    x = torch.randn(2, 1, 3)
    h0, c0 = torch.zeros(1, 4), torch.zeros(1, 4)
    w, u, b = torch.randn(16, 3), torch.randn(16, 4), torch.randn(16)
    saved, M.COMPILE_ON_CPU = M.COMPILE_ON_CPU, True
    try:
        lstm_layer_fast(x, h0, c0, w, u, b, use_compile=True)
    finally:
        M.COMPILE_ON_CPU = saved
    return M.compile_available()


# (impl, compile, compile on CPU too, C++ loops): the compiled steps run on CUDA, here COMPILE_ON_CPU
# covers them; the fast path's fp32 CPU default is the C++ loops (lstm_dist.cpu_loops), and the eager
# loops are what runs where those cannot be built
VARIANTS = [("reference", False, False, False), ("fast", False, False, False), ("fast", False, False, True),
            ("fast", True, True, False)]


def _cpu_loops_work() -> bool:
    from lstm_dist.model import cpu_loops

    return cpu_loops.get() is not None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


class TorchCharLSTM(torch.nn.Module):
    """The same model built from torch.nn.LSTM (the oracle)."""

    def __init__(self, ours: CharLSTM) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(ours.vocab_size, ours.embedding_size)
        self.lstm = torch.nn.LSTM(ours.embedding_size, ours.hidden_size, ours.num_layers)
        self.head = torch.nn.Linear(ours.hidden_size, ours.vocab_size)
        with torch.no_grad():
            self.embed.weight.copy_(ours.embed.weight)
            self.head.weight.copy_(ours.head.weight)
            self.head.bias.copy_(ours.head.bias)
            for k, cell in enumerate(ours.cells):
                getattr(self.lstm, f"weight_ih_l{k}").copy_(cell.weight_ih)
                getattr(self.lstm, f"weight_hh_l{k}").copy_(cell.weight_hh)
                # torch has two biases that are only ever summed: split ours unevenly to prove it
                getattr(self.lstm, f"bias_ih_l{k}").copy_(0.25 * cell.bias)
                getattr(self.lstm, f"bias_hh_l{k}").copy_(0.75 * cell.bias)

    def forward(self, x, state):
        y, state = self.lstm(self.embed(x.t()), state)
        return self.head(y).transpose(0, 1), state

    def grads(self, k_layers: int) -> dict:
        g = {"embed.weight": self.embed.weight.grad, "head.weight": self.head.weight.grad,
             "head.bias": self.head.bias.grad}
        for k in range(k_layers):
            g[f"cells.{k}.weight_ih"] = getattr(self.lstm, f"weight_ih_l{k}").grad
            g[f"cells.{k}.weight_hh"] = getattr(self.lstm, f"weight_hh_l{k}").grad
            g[f"cells.{k}.bias"] = getattr(self.lstm, f"bias_ih_l{k}").grad
            assert torch.equal(getattr(self.lstm, f"bias_ih_l{k}").grad, getattr(self.lstm, f"bias_hh_l{k}").grad)
        return g


def two_windows(net, x1, y1, x2, y2, h0, c0):
    """Two consecutive windows with the state carried (not detached), loss over both."""
    h0 = h0.clone().requires_grad_(True)
    c0 = c0.clone().requires_grad_(True)
    logits1, s1 = net(x1, (h0, c0))
    logits2, s2 = net(x2, s1)
    loss = F.cross_entropy(logits1.reshape(-1, VOCAB), y1.reshape(-1)) + F.cross_entropy(
        logits2.reshape(-1, VOCAB), y2.reshape(-1)
    )
    # the final state enters the loss too, so its gradient path (dh_T, dc_T) is tested
    loss = loss + 0.1 * s2[0].pow(2).sum() + 0.1 * s2[1].sin().sum()
    loss.backward()
    return logits1, logits2, s1, s2, h0.grad, c0.grad


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("impl,use_compile,compile_fwd,cpp", VARIANTS,
                         ids=["reference", "fast-eager-loops", "fast-cpp-loops", "fast-compiled-steps"])
def test_parity_with_torch_lstm_over_two_carried_windows(layers, impl, use_compile, compile_fwd, cpp, monkeypatch):
    if use_compile and not _compile_works():
        pytest.skip("torch.compile does not work on this machine (eager fallback is tested separately)")
    if cpp and not _cpu_loops_work():
        pytest.skip("the C++ loops cannot be built here (the eager loops are tested separately)")
    monkeypatch.setattr(M, "COMPILE_ON_CPU", compile_fwd)
    monkeypatch.setattr(M, "CPU_LOOPS", cpp)
    torch.manual_seed(layers)
    ours = CharLSTM(VOCAB, EMB, HID, layers, impl=impl, compile=use_compile)
    with torch.no_grad():  # a non-trivial bias so a mistake in any gate's bias path shows
        for cell in ours.cells:
            cell.bias.normal_(0, 0.5)
    theirs = TorchCharLSTM(ours)
    x = torch.randint(0, VOCAB, (BATCH, 2 * BPTT + 1))
    x1, y1, x2, y2 = x[:, :BPTT], x[:, 1 : BPTT + 1], x[:, BPTT : 2 * BPTT], x[:, BPTT + 1 :]
    h0 = torch.randn(layers, BATCH, HID)
    c0 = torch.randn(layers, BATCH, HID)
    a = two_windows(ours, x1, y1, x2, y2, h0, c0)
    b = two_windows(theirs, x1, y1, x2, y2, h0, c0)
    names = ["logits window 1", "logits window 2", "h after window 1", "c after window 1",
             "h after window 2", "c after window 2", "grad h0", "grad c0"]
    flat_a = [a[0], a[1], a[2][0], a[2][1], a[3][0], a[3][1], a[4], a[5]]
    flat_b = [b[0], b[1], b[2][0], b[2][1], b[3][0], b[3][1], b[4], b[5]]
    for name, u, v in zip(names, flat_a, flat_b):
        assert u.shape == v.shape, name
        assert rel_err(u, v) < 1e-5, (name, rel_err(u, v))
    ref_grads = theirs.grads(layers)
    params = dict(ours.named_parameters())
    assert set(params) == set(ref_grads)
    for name, p in params.items():
        assert p.grad is not None, name
        assert rel_err(p.grad, ref_grads[name]) < 1e-5, (name, rel_err(p.grad, ref_grads[name]))


def _window_args(dtype=torch.float64, steps=4, batch=2, inp=3, hid=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g, dtype=dtype) * 0.7).requires_grad_(True)  # noqa: E731
    return mk(steps, batch, inp), mk(batch, hid), mk(batch, hid), mk(4 * hid, inp), mk(4 * hid, hid), mk(4 * hid)


def test_gradcheck_hand_written_backward_float64_including_initial_state():
    args = _window_args()
    # every input is checked: x, h0, c0, W, U, b (h0 and c0 are the carried state)
    assert torch.autograd.gradcheck(lambda *a: LSTMWindow.apply(*a, None, False), args, eps=1e-6, atol=1e-6)
    # through the public wrapper as well, where h_T is a view of the outputs
    assert torch.autograd.gradcheck(lambda *a: lstm_layer_fast(*a), args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-steps"])
def test_fast_equals_reference_in_float64_with_gradients(compiled, monkeypatch):
    """Both forms of the pointwise steps (eager in-place ops; the functional ones CUDA compiles)."""
    if compiled and not _compile_works():
        pytest.skip("torch.compile does not work on this machine (eager fallback is tested separately)")
    monkeypatch.setattr(M, "COMPILE_ON_CPU", compiled)
    args = _window_args(steps=6, batch=3, inp=4, hid=7, seed=3)
    outs = []
    fast = lambda *a: lstm_layer_fast(*a, use_compile=compiled)  # noqa: E731
    for fn in (lstm_layer_reference, fast):
        leaves = [a.detach().clone().requires_grad_(True) for a in args]
        y, h, c = fn(*leaves)
        (y.pow(2).sum() + h.sum() * 0.3 + c.cos().sum()).backward()
        outs.append([y, h, c] + [a.grad for a in leaves])
    for u, v in zip(*outs):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_buffer_pool_never_aliases_live_data_and_reuses_freed_buffers():
    """Big CPU buffers are reused between windows only once nothing holds them."""
    torch.manual_seed(0)
    layer = LSTMLayer(16, 256)
    steps, batch = 32, 32  # every buffer above the pool's 1 MiB floor
    xs = [torch.randn(steps, batch, 16, requires_grad=True) for _ in range(3)]
    h0 = c0 = torch.zeros(batch, 256)
    y1, _, _ = layer(xs[0], h0, c0)
    kept = y1.detach().clone()
    y2, _, _ = layer(xs[1], h0, c0)  # while window 1's outputs and saved tensors are alive
    assert torch.equal(y1, kept)
    assert y1.untyped_storage().data_ptr() != y2.untyped_storage().data_ptr()
    (y1.sum() + y2.sum()).backward()
    ptrs = {y1.untyped_storage().data_ptr(), y2.untyped_storage().data_ptr()}
    g1 = layer.weight_hh.grad.clone()
    del y1, y2
    layer.zero_grad()
    y3, _, _ = layer(xs[0], h0, c0)
    assert y3.untyped_storage().data_ptr() in ptrs  # reused, not a fresh allocation
    torch.testing.assert_close(y3, kept)
    y3.sum().backward()
    pooled = M._POOL._bytes
    for _ in range(3):  # steady state: windows with backward do not grow the pool
        y, _, _ = layer(xs[2], h0, c0)
        y.sum().backward()
        del y
    assert M._POOL._bytes == pooled
    assert g1.abs().sum() > 0


def test_step_teacher_forced_matches_forward():
    torch.manual_seed(1)
    net = CharLSTM(VOCAB, EMB, HID, 2, dropout=0.3).eval()
    x = torch.randint(0, VOCAB, (BATCH, 9))
    state = (torch.randn(2, BATCH, HID), torch.randn(2, BATCH, HID))
    with torch.no_grad():
        logits, (h, c) = net(x, state)
    s = state
    for t in range(x.shape[1]):
        step_logits, s = net.step(x[:, t], s)
        torch.testing.assert_close(step_logits, logits[:, t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s[0], h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s[1], c, rtol=1e-5, atol=1e-5)
    # step from no state equals step from init_state's zeros
    a, _ = net.step(x[:, 0], None)
    b, _ = net.step(x[:, 0], net.init_state(BATCH))
    assert torch.equal(a, b)


def test_forward_shapes_state_none_and_init_state():
    net = CharLSTM(VOCAB, EMB, HID, 2)
    x = torch.randint(0, VOCAB, (BATCH, BPTT))
    logits, (h, c) = net(x, None)
    assert logits.shape == (BATCH, BPTT, VOCAB)
    # batch-major view of the time-major head output, not a copy (a loss reshapes it once anyway)
    assert logits.transpose(0, 1).is_contiguous()
    assert h.shape == c.shape == (2, BATCH, HID) and h.dtype == c.dtype == torch.float32
    zeros = net.init_state(BATCH)
    assert all(z.shape == (2, BATCH, HID) and z.dtype == torch.float32 and not z.any() for z in zeros)
    logits2, _ = net(x, zeros)
    assert torch.equal(logits, logits2)
    # the last layer's h_T is the last output fed to the head
    torch.testing.assert_close(net.head(h[-1]), logits[:, -1])


def test_detach_state_cuts_the_graph_and_keeps_values():
    net = CharLSTM(VOCAB, EMB, HID, 1)
    _, state = net(torch.randint(0, VOCAB, (BATCH, BPTT)), None)
    assert state[0].requires_grad
    d = detach_state(state)
    assert not d[0].requires_grad and not d[1].requires_grad
    assert torch.equal(d[0], state[0]) and torch.equal(d[1], state[1])
    assert detach_state(None) is None


def test_dropout_only_in_training_and_not_on_the_recurrent_path():
    torch.manual_seed(0)
    net = CharLSTM(VOCAB, EMB, HID, 2, dropout=0.5)
    x = torch.randint(0, VOCAB, (BATCH, BPTT))
    net.eval()
    e1, se = net(x, None)
    e2, _ = net(x, None)
    assert torch.equal(e1, e2)
    net.train()
    t1, st = net(x, None)
    t2, _ = net(x, None)
    assert not torch.equal(t1, t2)
    # the first layer sees no dropout (its input is the embedding): its state equals eval mode's
    torch.testing.assert_close(st[0][0], se[0][0])
    assert not torch.allclose(st[0][1], se[0][1])


def test_forget_gate_bias_initialised_to_one():
    net = CharLSTM(VOCAB, EMB, HID, 2)
    for cell in net.cells:
        b = cell.bias.detach()
        assert torch.equal(b[HID : 2 * HID], torch.ones(HID))
        assert not b[:HID].any() and not b[2 * HID :].any()
        bound = 1 / HID**0.5
        assert cell.weight_hh.abs().max() <= bound and cell.weight_ih.abs().max() <= bound


def test_from_config_rebuilds_a_saved_model(tmp_path):
    cfg = SimpleNamespace(embedding=EMB, hidden=HID, layers=2, dropout=0.1, impl="reference", compile=False)
    torch.manual_seed(0)
    a = CharLSTM(VOCAB, EMB, HID, 2, dropout=0.1, impl="fast", compile=True)
    path = tmp_path / "m.pt"
    torch.save(a.state_dict(), path)
    b = CharLSTM.from_config(cfg, VOCAB)
    assert (b.impl, b.num_layers, b.hidden_size, b.dropout) == ("reference", 2, HID, 0.1)
    b.load_state_dict(torch.load(path, weights_only=True))  # strict: keys and shapes identical
    assert list(a.state_dict()) == list(b.state_dict())
    x = torch.randint(0, VOCAB, (BATCH, BPTT))
    a.eval()
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x)[0], b(x)[0], rtol=1e-5, atol=1e-6)
    expected = {"embed.weight", "head.weight", "head.bias"} | {
        f"cells.{k}.{n}" for k in range(2) for n in ("weight_ih", "weight_hh", "bias")
    }
    assert set(a.state_dict()) == expected


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="impl"):
        CharLSTM(VOCAB, EMB, HID, 1, impl="cudnn")
    with pytest.raises(ValueError, match="dropout"):
        CharLSTM(VOCAB, EMB, HID, 1, dropout=1.0)
    with pytest.raises(ValueError, match="layers"):
        CharLSTM(VOCAB, EMB, HID, 0)
    with pytest.raises(ValueError, match="batch, time"):
        CharLSTM(VOCAB, EMB, HID, 1)(torch.zeros(4, dtype=torch.long))


def test_compile_falls_back_to_eager_with_one_warning_when_no_compiler_works(tmp_path):
    """A broken C++ compiler (and an empty kernel cache): the model still trains, with one warning."""
    script = textwrap.dedent(
        """
        import warnings, torch
        import lstm_dist.model.lstm
        from lstm_dist.model.lstm import compile_available
        lstm_dist.lstm.COMPILE_ON_CPU = True  # what CUDA does: compile both steps
        from lstm_dist.model.char_lstm import CharLSTM
        torch.manual_seed(0)
        ref = CharLSTM(11, 4, 6, 2, compile=False)
        net = CharLSTM(11, 4, 6, 2, compile=True)
        net.load_state_dict(ref.state_dict())
        x = torch.randint(0, 11, (2, 5))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                out, _ = net(x)
                out.sum().backward()
        ours = [w for w in caught if "LSTM pointwise" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert not compile_available()
        torch.testing.assert_close(out, ref(x)[0])
        print("FELL_BACK")
        """
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), CC=str(tmp_path / "no-such-compiler"),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FELL_BACK" in proc.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("impl,use_compile", [("reference", False), ("fast", False), ("fast", True)])
def test_bf16_autocast_on_cuda_matches_fp32(impl, use_compile):
    """What the cluster config runs (fast, compiled steps, bf16 autocast, 2 layers) against fp32."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    net = CharLSTM(64, 32, 128, 2, impl=impl, compile=use_compile).to(dev)
    x = torch.randint(0, 64, (8, 16), device=dev)
    state = tuple(s * 0.5 for s in (torch.randn(2, 8, 128, device=dev), torch.randn(2, 8, 128, device=dev)))
    ref, (rh, rc) = net(x, state)
    ref.float().sum().backward()
    g32 = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, (h, c) = net(x, state)
    assert h.dtype == torch.float32 and c.dtype == torch.float32  # state stays fp32
    out.float().sum().backward()
    if use_compile:
        assert M.compile_available(), "torch.compile of the pointwise steps failed on this GPU machine"
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(c, rc, rtol=5e-2, atol=5e-2)
    for p, g in zip(net.parameters(), g32):
        assert p.grad.dtype == torch.float32
        assert rel_err(p.grad, g) < 5e-2


@pytest.mark.cuda
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_a_cuda_window_never_synchronises_with_the_host(bf16):
    """torch's sync debug mode raises on any host synchronisation inside forward + backward."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    dev = torch.device("cuda")
    net = CharLSTM(64, 32, 128, 2, compile=True).to(dev)
    x = torch.randint(0, 64, (8, 16), device=dev)
    y = torch.randint(0, 64, (8, 16), device=dev)
    for window in range(2):  # the first window compiles (untested); the second is the steady state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if window else "default")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                logits, _ = net(x)
            F.cross_entropy(logits.float().reshape(-1, 64), y.reshape(-1)).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_ddp_wrapped_model_trains_like_the_plain_one(tmp_path):
    """One-process gloo group: DDP's all-reduce hooks see every parameter's gradient from the Function.

    In a process of its own, as training runs it: in the long-lived pytest process, torch 2.13 can
    deadlock when the gloo group is destroyed while its worker thread still frees a finished
    all-reduce that holds a Python object from the caller's thread state (seen in CI: the worker
    waits for the GIL, the main thread holds it and joins the worker).
    """
    script = textwrap.dedent(f"""
        import torch, torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel
        from lstm_dist.model.char_lstm import CharLSTM, detach_state
        dist.init_process_group("gloo", store=dist.FileStore({str(tmp_path / "store")!r}, 1), rank=0, world_size=1)
        torch.manual_seed(0)
        plain = CharLSTM({VOCAB}, {EMB}, {HID}, 2, dropout=0.0)
        wrapped = DistributedDataParallel(CharLSTM({VOCAB}, {EMB}, {HID}, 2, dropout=0.0))
        wrapped.module.load_state_dict(plain.state_dict())
        x = torch.randint(0, {VOCAB}, ({BATCH}, {BPTT}))
        state = None
        for _ in range(2):  # two windows, state detached between them as in training
            for net in (plain, wrapped):
                net.zero_grad()
            out_a, s_a = plain(x, state)
            out_b, _ = wrapped(x, state)
            out_a.sum().backward()
            out_b.sum().backward()
            for (name, p), q in zip(plain.named_parameters(), wrapped.module.parameters()):
                assert q.grad is not None, name
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)
            state = detach_state(s_a)
        del wrapped
        dist.destroy_process_group()
        print("grads agree")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "grads agree" in proc.stdout


def test_fp32_paths_with_and_without_mkl_packed_gemm_agree(monkeypatch):
    """The addmm path (torch builds without MKL's packed GEMM) gives the packed path's numbers."""
    args = [a.detach().float().requires_grad_(True) for a in _window_args(steps=5, batch=4, inp=3, hid=6, seed=7)]
    outs = []
    for packed in (True, False):
        monkeypatch.setattr(M, "USE_MKL_PACKED", packed)
        leaves = [a.detach().clone().requires_grad_(True) for a in args]
        y, h, c = lstm_layer_fast(*leaves)
        (y.pow(2).sum() + c.sum()).backward()
        outs.append([y, c] + [a.grad for a in leaves])
    for u, v in zip(*outs):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_on_cpu_runs_the_low_precision_path():
    """The matmul-in-bf16, state-in-fp32 path (the CUDA training path) checked here on CPU autocast."""
    torch.manual_seed(0)
    net = CharLSTM(VOCAB, 16, 32, 2, impl="fast")
    x = torch.randint(0, VOCAB, (4, 12))
    state = (torch.randn(2, 4, 32) * 0.5, torch.randn(2, 4, 32) * 0.5)
    ref, (_, rc) = net(x, state)
    ref.sum().backward()
    g32 = {n: p.grad.clone() for n, p in net.named_parameters()}
    for impl in ("fast", "reference"):
        net.impl = impl
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, (h, c) = net(x, state)
        assert h.dtype == torch.float32 and c.dtype == torch.float32  # the state stays fp32
        out.float().sum().backward()
        torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(c, rc, rtol=5e-2, atol=5e-2)
        for n, p in net.named_parameters():
            assert p.grad.dtype == torch.float32
            assert rel_err(p.grad, g32[n]) < 5e-2, (impl, n, rel_err(p.grad, g32[n]))


def test_cpp_loops_compute_what_the_eager_loops_compute(monkeypatch):
    """The C++ time loops (fp32 CPU default) against the eager ones, at a width that is not a multiple
    of the vector length (the row tail) and several rows per thread: values and every gradient."""
    if not _cpu_loops_work():
        pytest.skip("the C++ loops cannot be built here (their fallback is tested separately)")
    args = [a.detach().float() for a in _window_args(steps=9, batch=5, inp=6, hid=21, seed=11)]
    outs = []
    for cpp in (False, True):
        monkeypatch.setattr(M, "CPU_LOOPS", cpp)
        leaves = [a.clone().requires_grad_(True) for a in args]
        y, h, c = lstm_layer_fast(*leaves)
        (y.pow(2).sum() + h.sum() * 0.3 + c.cos().sum()).backward()
        outs.append([y, c] + [a.grad for a in leaves])
    for name, u, v in zip(["y", "c_T", "dx", "dh0", "dc0", "dW", "dU", "db"], *outs):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=2e-6, msg=name)
    assert not torch.equal(outs[0][0], outs[1][0]), "both runs took the same loops"


def test_cpp_loops_fall_back_to_the_eager_loops_where_they_cannot_be_built(tmp_path):
    """No working C++ compiler and an empty extension cache: get() says why, the layer still runs."""
    script = textwrap.dedent(
        """
        import torch
        from lstm_dist.model import cpu_loops
        from lstm_dist.model import lstm
        from lstm_dist.model.lstm import lstm_layer_fast
        x, h0, c0 = torch.randn(3, 2, 4), torch.zeros(2, 5), torch.zeros(2, 5)
        w, u, b = torch.randn(20, 4), torch.randn(20, 5), torch.zeros(20)
        y, _, _ = lstm_layer_fast(x, h0, c0, w, u, b)
        assert cpu_loops.get() is None
        print("WHY", cpu_loops.failure())
        lstm.CPU_LOOPS = False
        torch.testing.assert_close(y, lstm_layer_fast(x, h0, c0, w, u, b)[0], rtol=0, atol=0)
        """
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), CC=str(tmp_path / "no-such-compiler"),
               TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    why = next(line for line in proc.stdout.splitlines() if line.startswith("WHY "))
    assert why != "WHY None" and "Error" in why, why
    # and switched off by the environment, it says so
    proc = subprocess.run([sys.executable, "-c", "from lstm_dist import cpu_loops; print(cpu_loops.get(), "
                           "cpu_loops.failure())"], cwd=ROOT, env=dict(env, LSTM_DIST_CPU_LOOPS="0"),
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "None LSTM_DIST_CPU_LOOPS=0", proc.stdout + proc.stderr
