"""The LSTM: every path of the kernel table against torch.nn.LSTM and the reference, the hand-written
backward, the kernel choice, step(), rebuilding, precision."""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lstm_dist.common.errors import UserError
from lstm_dist.config import ModelConfig, choices
from lstm_dist.model.buffers import POOL
from lstm_dist.model.cell import lstm_layer_reference
from lstm_dist.model.char_lstm import CharLSTM, LSTMLayer, detach_state
from lstm_dist.model.fast import LSTMWindow, lstm_layer_fast
from lstm_dist.model import kernels as kernels_module, products
from lstm_dist.model.kernels import KERNELS, NOTE_BF16_ON_CPU, Kernels, choose_kernels
from lstm_dist.model.products import CpuProducts

ROOT = Path(__file__).resolve().parents[1]
VOCAB, EMB, HID, BATCH, BPTT = 13, 6, 8, 3, 5
CPU = torch.device("cpu")

# Every entry of the kernel table is a test parameter: a new path is tested here by being in the table.
ENTRIES = list(KERNELS)
FAST_ENTRIES = [name for name, spec in KERNELS.items() if spec.forward_loop is not None]


@functools.cache
def _why_not_here(name: str):
    spec = KERNELS[name]
    return None if spec.why_not is None else spec.why_not(CPU, 2, 4)


def kernels_here(name: str, **fields) -> Kernels:
    """The table's entry `name` as this CPU runs it, the CUDA-only ones forced onto the CPU (as the
    compiled steps are: inductor compiles them for the CPU too), or a skip saying why it cannot run here."""
    why = _why_not_here(name)
    if why is not None:
        pytest.skip(f"the {name} kernels cannot run here: {why}")
    return Kernels(name, force="cpu" not in KERNELS[name].devices, **fields)


def every_site(impl: str) -> CpuProducts:
    """`impl` for every CPU matrix product of the fast path that has it, BLAS's for the others."""
    return CpuProducts(**{site: impl if impl in products.SITE_IMPLS[site] else "blas" for site in products.SITES})


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
@pytest.mark.parametrize("name", ENTRIES)
def test_parity_with_torch_lstm_over_two_carried_windows(layers, name):
    _parity_with_torch_lstm(layers, kernels_here(name), name)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("name", FAST_ENTRIES)
def test_parity_with_torch_lstm_with_the_first_layer_by_table(layers, name, monkeypatch):
    """The first layer's input gates looked up in the [V,4H] table embedding · Wᵀ + b (Kernels.input_table),
    its gradient scattered back: the same logits, states and gradients as nn.LSTM (the threshold lowered so
    that this small window uses the table)."""
    monkeypatch.setattr(kernels_module, "TABLE_ROWS_PER_TOKEN", 1)
    kernels = kernels_here(name, input_table=True)
    assert kernels.table_input(VOCAB, BATCH * BPTT) and not Kernels(name).table_input(VOCAB, BATCH * BPTT)
    _parity_with_torch_lstm(layers, kernels, name)


def _parity_with_torch_lstm(layers, kernels, name):
    torch.manual_seed(layers)
    ours = CharLSTM(VOCAB, EMB, HID, layers, kernels=kernels)
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
    for what, u, v in zip(names, flat_a, flat_b):
        assert u.shape == v.shape, what
        assert rel_err(u, v) < 1e-5, (what, rel_err(u, v))
    ref_grads = theirs.grads(layers)
    params = dict(ours.named_parameters())
    assert set(params) == set(ref_grads)
    for key, p in params.items():
        assert p.grad is not None, key
        assert rel_err(p.grad, ref_grads[key]) < 1e-5, (key, rel_err(p.grad, ref_grads[key]))
    if KERNELS[name].forward_loop is not None:  # the entry's own loops ran, not the eager fallback
        assert kernels.for_window("cpu", torch.float32, False) is KERNELS[name]
    if name == "compiled":
        assert kernels.runs_compiled(), "the compiled steps fell back to eager"


def _window_args(dtype=torch.float64, steps=4, batch=2, inp=3, hid=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g, dtype=dtype) * 0.7).requires_grad_(True)  # noqa: E731
    return mk(steps, batch, inp), mk(batch, hid), mk(batch, hid), mk(4 * hid, inp), mk(4 * hid, hid), mk(4 * hid)


def test_gradcheck_hand_written_backward_float64_including_initial_state():
    args = _window_args()
    # every input is checked: x, h0, c0, W, U, b (h0 and c0 are the carried state)
    assert torch.autograd.gradcheck(lambda *a: LSTMWindow.apply(*a, None, Kernels(), True), args, eps=1e-6, atol=1e-6)
    # through the public wrapper as well, where h_T is a view of the outputs
    assert torch.autograd.gradcheck(lambda *a: lstm_layer_fast(*a, Kernels()), args, eps=1e-6, atol=1e-6)


def test_gradcheck_the_first_layer_by_table_float64():
    """The window with token ids and a [V,4H] table in W's place (no bias): gradients of the table (the
    scatter of dgates by token, repeated tokens included), h0, c0 and U."""
    x, h0, c0, _, u, _ = _window_args()
    table = (torch.randn(7, u.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.7)
    tokens = torch.tensor([[0, 3], [3, 3], [6, 0], [1, 3]])  # [T=4, B=2], token 3 four times
    args = (h0, c0, table.requires_grad_(True), u)
    fn = lambda h, c, w, uu: LSTMWindow.apply(tokens, h, c, w, uu, None, None, Kernels(), True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)
    # and it is the float window on the table's rows, the bias inside them
    y_tab, c_tab = fn(*args)
    y_rows, c_rows = LSTMWindow.apply(table.detach()[tokens], h0, c0, torch.eye(u.shape[0], dtype=torch.float64), u,
                                      torch.zeros(u.shape[0], dtype=torch.float64), None, Kernels(), True)
    torch.testing.assert_close((y_tab, c_tab), (y_rows, c_rows), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in FAST_ENTRIES if torch.float64 in KERNELS[n].dtypes])
def test_fast_equals_reference_in_float64_with_gradients(name):
    """Each form of the pointwise steps that computes in float64 (eager in-place ops; the functional
    ones CUDA compiles) against the reference to 1e-12."""
    kernels = kernels_here(name)
    args = _window_args(steps=6, batch=3, inp=4, hid=7, seed=3)
    outs = []
    fast = lambda *a: lstm_layer_fast(*a, kernels)  # noqa: E731
    for fn in (lstm_layer_reference, fast):
        leaves = [a.detach().clone().requires_grad_(True) for a in args]
        y, h, c = fn(*leaves)
        (y.pow(2).sum() + h.sum() * 0.3 + c.cos().sum()).backward()
        outs.append([y, h, c] + [a.grad for a in leaves])
    for u, v in zip(*outs):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    assert kernels.for_window("cpu", torch.float64, False) is KERNELS[name]  # not the eager fallback


def test_buffer_pool_never_aliases_live_data_and_reuses_freed_buffers():
    """Big CPU buffers are reused between windows only once nothing holds them."""
    torch.manual_seed(0)
    layer = LSTMLayer(16, 256)
    steps, batch = 32, 32  # every buffer above the pool's 1 MiB floor
    xs = [torch.randn(steps, batch, 16, requires_grad=True) for _ in range(3)]
    h0 = c0 = torch.zeros(batch, 256)
    kernels = Kernels()
    y1, _, _ = layer(xs[0], h0, c0, kernels)
    kept = y1.detach().clone()
    y2, _, _ = layer(xs[1], h0, c0, kernels)  # while window 1's outputs and saved tensors are alive
    assert torch.equal(y1, kept)
    assert y1.untyped_storage().data_ptr() != y2.untyped_storage().data_ptr()
    (y1.sum() + y2.sum()).backward()
    ptrs = {y1.untyped_storage().data_ptr(), y2.untyped_storage().data_ptr()}
    g1 = layer.weight_hh.grad.clone()
    del y1, y2
    layer.zero_grad()
    y3, _, _ = layer(xs[0], h0, c0, kernels)
    assert y3.untyped_storage().data_ptr() in ptrs  # reused, not a fresh allocation
    torch.testing.assert_close(y3, kept)
    y3.sum().backward()
    pooled = POOL._bytes
    for _ in range(3):  # steady state: windows with backward do not grow the pool
        y, _, _ = layer(xs[2], h0, c0, kernels)
        y.sum().backward()
        del y
    assert POOL._bytes == pooled
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
    cfg = ModelConfig(embedding=EMB, hidden=HID, layers=2, dropout=0.1, impl="reference", compile=False)
    torch.manual_seed(0)
    a = CharLSTM(VOCAB, EMB, HID, 2, dropout=0.1, kernels=Kernels("eager"))
    path = tmp_path / "m.pt"
    torch.save(a.state_dict(), path)
    b = CharLSTM.from_config(cfg, VOCAB, kernels=Kernels("reference"))
    assert (b.kernels.name, b.num_layers, b.hidden_size, b.dropout) == ("reference", 2, HID, 0.1)
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
    # kernels of another model.impl than the config's are refused
    with pytest.raises(ValueError, match="model.impl=fast"):
        CharLSTM.from_config(cfg, VOCAB, kernels=Kernels("eager"))


def test_load_model_rebuilds_with_the_kernels_chosen_for_its_config(tmp_path):
    """The inference entry points' model: the checkpoint's model.impl, model.compile off, the kernels
    `choose_kernels` gives on this machine (the C++ loops on the CPU where they build)."""
    from lstm_dist.config import Config
    from lstm_dist.inference.load import load_model
    from lstm_dist.training.checkpoint import FORMAT

    cfg = Config()
    cfg.model = ModelConfig(embedding=EMB, hidden=HID, layers=2, impl="fast", compile=True)
    torch.manual_seed(0)
    net = CharLSTM.from_config(cfg.model, 256, kernels=Kernels("eager"))
    torch.save({"format": FORMAT, "step": 3, "config": cfg.to_dict(), "vocab": {"kind": "bytes", "size": 256},
                "model": net.state_dict()}, tmp_path / "ckpt.pt")
    said = []
    loaded = load_model(tmp_path / "ckpt.pt", "cpu", say=said.append)
    expected = choose_kernels(dataclasses.replace(cfg.model, compile=False), "fp32", CPU, batch=1, say=said.append)
    assert loaded.model.kernels == expected and expected.name in ("cpp_loops", "eager") and loaded.step == 3
    x = torch.randint(0, 256, (BATCH, BPTT))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x)[0], net.eval()(x)[0], rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_rejected():
    """Sizes by the config's own rules (a UserError naming the setting), kernels by the table."""
    with pytest.raises(ValueError, match="no LSTM kernels named 'cudnn'; the table has reference"):
        Kernels("cudnn")
    with pytest.raises(UserError, match="model.impl"):
        choose_kernels(ModelConfig(impl="cudnn"), "fp32", CPU, batch=1, say=print)  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"model.dropout must be in \[0, 1\), got 1.0"):
        CharLSTM(VOCAB, EMB, HID, 1, dropout=1.0)
    with pytest.raises(UserError, match="model.layers must be > 0, got 0"):
        CharLSTM(VOCAB, EMB, HID, 0)
    with pytest.raises(ValueError, match="vocab_size"):
        CharLSTM(0, EMB, HID, 1)
    with pytest.raises(ValueError, match="batch, time"):
        CharLSTM(VOCAB, EMB, HID, 1)(torch.zeros(4, dtype=torch.long))


def test_the_table_covers_every_model_impl_and_says_what_each_entry_supports():
    assert {spec.impl for spec in KERNELS.values()} == set(choices("model.impl"))
    for name, spec in KERNELS.items():
        assert spec.devices and spec.dtypes and spec.phrase, name
        assert (spec.forward_loop is None) == (spec.backward_loop is None), name
        if spec.why_not is not None or spec.fault:  # a rank that cannot run it says so in one line
            assert "{rank}" in spec.fallback and "{why}" in spec.fallback, name
    # a window an entry does not take runs the eager loops
    eager, cpp, compiled = KERNELS["eager"], KERNELS["cpp_loops"], KERNELS["compiled"]
    assert Kernels("cpp_loops").for_window("cpu", torch.float32, False) is cpp
    assert Kernels("cpp_loops").for_window("cpu", torch.float32, True) is eager  # under autocast
    assert Kernels("cpp_loops").for_window("cpu", torch.float64, False) is eager
    assert Kernels("cpp_loops").for_window("cuda", torch.float32, False) is eager
    assert Kernels("compiled").for_window("cpu", torch.float32, True) is eager
    assert Kernels("compiled", force=True).for_window("cpu", torch.float32, True) is compiled
    with pytest.raises(ValueError, match="no time loops"):
        Kernels("reference").for_window("cpu", torch.float32, False)
    assert Kernels("cpp_loops").describe() == "fp32, C++ CPU loops"
    assert Kernels("compiled", bf16=True).describe() == "bf16, compiled CUDA steps"
    # the Triton step kernels: asked for by model.triton only, tried before the compiled steps
    names = list(KERNELS)
    assert names.index("triton") < names.index("compiled")
    assert KERNELS["triton"].wanted(ModelConfig(triton=True), torch.device("cuda"))
    assert not KERNELS["triton"].wanted(ModelConfig(), torch.device("cuda"))
    assert Kernels("compiled").compiles() and not Kernels("triton").compiles() and not Kernels("cpp_loops").compiles()
    assert Kernels("triton", bf16=True).describe() == "bf16, Triton step kernels"
    with warnings.catch_warnings():  # torch warns when it makes a CUDA autocast without a GPU
        warnings.simplefilter("ignore")
        assert isinstance(Kernels("compiled", bf16=True).autocast(), torch.autocast)
    assert not isinstance(Kernels("eager").autocast(), torch.autocast)


def test_the_choice_maps_the_config_to_an_entry_on_the_cpu():
    """model.impl and model.compile as users write them, the precision note, and the C++ loops (or,
    where they cannot run, the eager ones with rank 0's warning). No random number is drawn."""
    said = []
    rng = torch.get_rng_state()
    fast = ModelConfig(hidden=HID, impl="fast", compile=True)
    k = choose_kernels(fast, "bf16", CPU, batch=BATCH, say=said.append)
    assert said[0] == NOTE_BF16_ON_CPU and not k.bf16
    why = _why_not_here("cpp_loops")
    if why is None:
        assert k == Kernels("cpp_loops") and said == [NOTE_BF16_ON_CPU]
        # a training window with at least TABLE_ROWS_PER_TOKEN rows per token: the first layer by table
        rows = kernels_module.TABLE_ROWS_PER_TOKEN * VOCAB
        k = choose_kernels(fast, "fp32", CPU, batch=BATCH, say=said.append, bptt=-(-rows // BATCH), vocab=VOCAB)
        assert k.input_table and k.describe() == "fp32, C++ CPU loops, input by table"
        assert not choose_kernels(fast, "fp32", CPU, batch=BATCH, say=said.append, bptt=rows // BATCH - 1,
                                  vocab=VOCAB).input_table
    else:  # the C++ loops cannot be built here: every rank runs the eager ones, and says why
        assert k == Kernels("eager") and said[1].startswith("warning: the C++ LSTM loops are not available on rank 0")
    ref = choose_kernels(dataclasses.replace(fast, impl="reference"), "auto", CPU, batch=BATCH, say=said.append)
    assert ref == Kernels("reference") and ref.describe() == "fp32, reference autograd steps"
    assert torch.equal(torch.get_rng_state(), rng)
    # (LSTM_DIST_CPU_LOOPS=0: test_cpp_loops_fall_back_to_the_eager_loops_where_they_cannot_be_built)


def test_compile_falls_back_to_eager_with_one_warning_when_no_compiler_works(tmp_path):
    """A broken C++ compiler (and an empty kernel cache): the model still trains, with one warning."""
    script = textwrap.dedent(
        """
        import warnings, torch
        from lstm_dist.model.char_lstm import CharLSTM
        from lstm_dist.model.kernels import Kernels
        torch.manual_seed(0)
        ref = CharLSTM(11, 4, 6, 2)
        kernels = Kernels("compiled", force=True)  # what CUDA runs: compile both steps
        net = CharLSTM(11, 4, 6, 2, kernels=kernels)
        net.load_state_dict(ref.state_dict())
        x = torch.randint(0, 11, (2, 5))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                out, _ = net(x)
                out.sum().backward()
        ours = [w for w in caught if "LSTM pointwise" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert not kernels.runs_compiled()
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
@pytest.mark.parametrize("name", [n for n, spec in KERNELS.items() if "cuda" in spec.devices])
def test_bf16_autocast_on_cuda_matches_fp32(name):
    """What the cluster config runs (compiled steps, bf16 autocast, 2 layers), and each other CUDA
    entry, under `Kernels.autocast` against the same entry in fp32."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    kernels = Kernels(name, bf16=True)
    net = CharLSTM(64, 32, 128, 2, kernels=dataclasses.replace(kernels, bf16=False)).to(dev)
    x = torch.randint(0, 64, (8, 16), device=dev)
    state = tuple(s * 0.5 for s in (torch.randn(2, 8, 128, device=dev), torch.randn(2, 8, 128, device=dev)))
    ref, (rh, rc) = net(x, state)
    ref.float().sum().backward()
    g32 = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net.kernels = kernels
    with kernels.autocast():
        out, (h, c) = net(x, state)
    assert out.dtype == torch.bfloat16  # the head's product ran in bf16: autocast was on
    assert h.dtype == torch.float32 and c.dtype == torch.float32  # state stays fp32
    out.float().sum().backward()
    if name == "compiled":
        assert kernels.runs_compiled(), "torch.compile of the pointwise steps failed on this GPU machine"
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
    net = CharLSTM(64, 32, 128, 2, kernels=Kernels("compiled", bf16=bf16)).to(dev)
    x = torch.randint(0, 64, (8, 16), device=dev)
    y = torch.randint(0, 64, (8, 16), device=dev)
    for window in range(2):  # the first window compiles (untested); the second is the steady state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if window else "default")
        try:
            with net.kernels.autocast():
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
        from lstm_dist.model.kernels import Kernels
        dist.init_process_group("gloo", store=dist.FileStore({str(tmp_path / "store")!r}, 1), rank=0, world_size=1)
        torch.manual_seed(0)
        kernels = Kernels("cpp_loops")  # what CPU training runs (the eager loops where they cannot be built)
        plain = CharLSTM({VOCAB}, {EMB}, {HID}, 2, dropout=0.0, kernels=kernels)
        wrapped = DistributedDataParallel(CharLSTM({VOCAB}, {EMB}, {HID}, 2, dropout=0.0, kernels=kernels))
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


@pytest.mark.parametrize("product", [p for p in products.IMPLS + products.ORDERS if p != "blas"])
@pytest.mark.parametrize("name", [n for n in FAST_ENTRIES if "cpu" in KERNELS[n].devices])
def test_fp32_paths_give_the_blas_numbers_whatever_implementation_runs_the_products(name, product):
    """Every matrix product of a CPU window (steps, input projection, dX) by MKL's packed GEMM or oneDNN,
    and the weight gradients in the other operand order (blas_t), give the BLAS path's numbers (rounding
    apart): values and every gradient."""
    if not products.usable(product):
        pytest.skip(f"this torch has no {product} product")
    args = [a.detach().float().requires_grad_(True) for a in _window_args(steps=5, batch=4, inp=3, hid=6, seed=7)]
    outs = []
    for impl in (product, "blas"):
        kernels = kernels_here(name, products=every_site(impl))
        leaves = [a.detach().clone().requires_grad_(True) for a in args]
        y, h, c = lstm_layer_fast(*leaves, kernels)
        (y.pow(2).sum() + c.sum()).backward()
        outs.append([y, c] + [a.grad for a in leaves])
    for u, v in zip(*outs):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_on_cpu_runs_the_low_precision_path():
    """The matmul-in-bf16, state-in-fp32 path (the CUDA training path) checked here on CPU autocast,
    through every entry that runs here (the C++ loops hand such a window to the eager ones)."""
    torch.manual_seed(0)
    net = CharLSTM(VOCAB, 16, 32, 2)
    x = torch.randint(0, VOCAB, (4, 12))
    state = (torch.randn(2, 4, 32) * 0.5, torch.randn(2, 4, 32) * 0.5)
    ref, (_, rc) = net(x, state)
    ref.sum().backward()
    g32 = {n: p.grad.clone() for n, p in net.named_parameters()}
    for name in ENTRIES:
        if _why_not_here(name) is not None:
            continue
        net.kernels = kernels_here(name)
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, (h, c) = net(x, state)
        assert h.dtype == torch.float32 and c.dtype == torch.float32  # the state stays fp32
        out.float().sum().backward()
        torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(c, rc, rtol=5e-2, atol=5e-2)
        for n, p in net.named_parameters():
            assert p.grad.dtype == torch.float32
            assert rel_err(p.grad, g32[n]) < 5e-2, (name, n, rel_err(p.grad, g32[n]))


def test_cpp_loops_compute_what_the_eager_loops_compute():
    """The C++ time loops (fp32 CPU default) against the eager ones, at a width that is not a multiple
    of the vector length (the row tail) and several rows per thread: values and every gradient."""
    args = [a.detach().float() for a in _window_args(steps=9, batch=5, inp=6, hid=21, seed=11)]
    outs = []
    for kernels in (Kernels("eager"), kernels_here("cpp_loops")):
        leaves = [a.clone().requires_grad_(True) for a in args]
        y, h, c = lstm_layer_fast(*leaves, kernels)
        (y.pow(2).sum() + h.sum() * 0.3 + c.cos().sum()).backward()
        outs.append([y, c] + [a.grad for a in leaves])
    for name, u, v in zip(["y", "c_T", "dx", "dh0", "dc0", "dW", "dU", "db"], *outs):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=2e-6, msg=name)
    assert not torch.equal(outs[0][0], outs[1][0]), "both runs took the same loops"


def test_cpp_loops_fall_back_to_the_eager_loops_where_they_cannot_be_built(tmp_path):
    """No working C++ compiler and an empty extension cache: get() says why, the layer still runs (the
    eager loops, bit for bit); and switched off by LSTM_DIST_CPU_LOOPS=0, the choice says so and
    nothing is built."""
    script = textwrap.dedent(
        """
        import os, torch
        from lstm_dist.config import ModelConfig
        from lstm_dist.model import cpu_loops
        from lstm_dist.model.fast import lstm_layer_fast
        from lstm_dist.model.kernels import Kernels, choose_kernels
        if os.environ.get("LSTM_DIST_CPU_LOOPS") == "0":
            print("CHOSE", choose_kernels(ModelConfig(hidden=5), "fp32", torch.device("cpu"), batch=2, say=print).name)
            raise SystemExit
        x, h0, c0 = torch.randn(3, 2, 4), torch.zeros(2, 5), torch.zeros(2, 5)
        w, u, b = torch.randn(20, 4), torch.randn(20, 5), torch.zeros(20)
        y, _, _ = lstm_layer_fast(x, h0, c0, w, u, b, Kernels("cpp_loops"))
        assert cpu_loops.get() is None
        print("WHY", cpu_loops.failure())
        torch.testing.assert_close(y, lstm_layer_fast(x, h0, c0, w, u, b, Kernels("eager"))[0], rtol=0, atol=0)
        """
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), CC=str(tmp_path / "no-such-compiler"),
               TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), PYTHONPATH=str(ROOT))
    env.pop("LSTM_DIST_CPU_LOOPS", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    why = next(line for line in proc.stdout.splitlines() if line.startswith("WHY "))
    assert why != "WHY None" and "Error" in why, why
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext-off"), LSTM_DIST_CPU_LOOPS="0")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [
        "warning: the C++ LSTM loops are not available on rank 0 (LSTM_DIST_CPU_LOOPS=0); every rank runs the "
        "eager loops (slower on the CPU, the same numbers to ~5e-7)", "CHOSE eager"], proc.stdout
    assert not (tmp_path / "ext-off").exists()  # nothing was built, nor a build directory made


# ---------------------------------------------------------------- TF32


def test_tf32_is_a_cuda_setting_said_where_the_precision_is_said():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    for setting in (True, False):
        k = choose_kernels(ModelConfig(hidden=5, compile=False), "fp32", CPU, batch=2, say=print, tf32=setting)
        assert not k.tf32 and k.precision() == "fp32"  # the CPU has no TF32: nothing claimed, no flag touched
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert Kernels("eager", tf32=True).precision() == "fp32 (TF32 products)"
    assert Kernels("eager", bf16=True, tf32=True).precision() == "bf16"
    assert Kernels("cpp_loops").describe().startswith("fp32, ")
    from lstm_dist.bench.timing import baseline_dtype
    from lstm_dist.config import TrainConfig

    assert TrainConfig().tf32 is True  # as cuDNN's LSTM, which the benches compare with
    assert baseline_dtype("float32", torch.device("cuda"), tf32=True) == "float32 (TF32 products)"
    assert baseline_dtype("float32", CPU, tf32=True) == "float32"


@pytest.mark.cuda
def test_tf32_setting_sets_both_flags_on_cuda():
    cuda = torch.device("cuda")
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        for setting in (True, False):
            k = choose_kernels(ModelConfig(hidden=8, compile=False), "fp32", cuda, batch=2, say=print, tf32=setting)
            assert k.tf32 is setting
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (setting, setting)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
