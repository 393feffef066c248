"""The LSTM from its equations, a hand-derived backward, and the character-level model around it.

The cell (one layer, one time step; x the input, (h, c) the carried state, ⊙ the elementwise product):

    i  = σ(W_i x + U_i h + b_i)          input gate
    f  = σ(W_f x + U_f h + b_f)          forget gate
    g  = tanh(W_g x + U_g h + b_g)       candidate cell
    o  = σ(W_o x + U_o h + b_o)          output gate
    c' = f ⊙ c + i ⊙ g
    h' = o ⊙ tanh(c')

Weight layout (per layer k, the same as torch.nn.LSTM so weights copy over without reshuffling):

    cells.k.weight_ih  [4H, E_k]   rows stacked [W_i; W_f; W_g; W_o]   (E_0 = embedding, E_k = H for k > 0)
    cells.k.weight_hh  [4H, H]     rows stacked [U_i; U_f; U_g; U_o]
    cells.k.bias       [4H]        stacked [b_i; b_f; b_g; b_o]

so one matrix product gives all four gates' pre-activations: gates = x W^T + h U^T + b, and
gates[:, 0:H] is i, [H:2H] f, [2H:3H] g, [3H:4H] o. There is ONE bias per layer: torch.nn.LSTM has
two (b_ih and b_hh) that only ever appear summed, so to copy a torch.nn.LSTM use b = b_ih + b_hh.

Initialisation: every weight U(-1/√H, 1/√H) (what torch.nn.LSTM does, so the two start from the same
distribution), the bias 0 except the forget gate's, which is 1. With f ≈ σ(1) ≈ 0.73 at the start the
cell keeps most of its content from step to step, so gradients reach back across the window from the
first update instead of having to learn to remember first (Gers et al. 2000; Jozefowicz et al. 2015
found it closed most of the gap between the LSTM and later variants).

Two implementations of a layer over a window of T steps, same parameters and same numbers:

- `lstm_layer_reference`: the equations step by step (`lstm_cell`) under ordinary autograd.
- `lstm_layer_fast` (the default): one `torch.autograd.Function` per layer and window. Forward: the
  input projection of the whole window is one matrix product written into a preallocated gates
  buffer; per step only the recurrent product (added in place) and the pointwise cell update, written
  into preallocated buffers. Backward, derived by hand from the equations above, walking t = T-1 .. 0:

      dh_t  = dy_t + dgates_{t+1} U                    (recurrent product, written in place)
      do    = dh_t ⊙ tanh(c_t)
      dc_t  = dc_{t+1}·f_{t+1} + dh_t ⊙ o ⊙ (1 - tanh²(c_t))
      di = dc_t ⊙ g,  df = dc_t ⊙ c_{t-1},  dg = dc_t ⊙ i
      dgates_t = [di·i(1-i), df·f(1-f), dg·(1-g²), do·o(1-o)]     (through σ and tanh)

  and after the loop the weight gradients as single products over all T·B rows of the window:
  dW = dgates^T X, dU = dgates^T [h_{-1}, …, h_{T-2}], db = Σ dgates, dX = dgates W. Gradients reach
  the initial state too: dh_{-1} = dgates_0 U, dc_{-1} = dc_0 ⊙ f_0.

The pointwise work of a step can be fused with `torch.compile` (one small function with fixed shapes,
never the time loop, so compile time does not grow with the window); with `compile=False`, or where
no compiler works (one warning, then eager), the same steps run as in-place eager ops. On CPU only
the backward step is compiled (see `_pointwise_fns` for the measurement behind that).

Where the CPU time goes, and what the fast path does about it (numbers: this repo's bench, 2 cores):
- matrix products are ~80% of a window: the input product and the weight gradients are single big
  GEMMs over the window; the recurrent product per step uses MKL's packed-weight GEMM when this torch
  has it (U packed once per window instead of inside every call), else addmm into the gates buffer;
- big buffers (gates, states, dgates: ~190 MB per window at batch 64 / hidden 512) are reused through
  `_BufferPool` instead of being page-faulted in afresh every window (that alone was ~15% of a window);
- the bias rides in the input GEMM as a column of ones ([X | 1] [W | b]^T), so neither a broadcast
  copy of the bias over the window nor a separate column sum for db is needed;
- per step, views of the buffers are made once per window (unbind) and the pointwise update is a few
  in-place ops (forward 7, backward 11) with no allocation.

Precision: the recurrent state (h, c), the gates and the cell update are always fp32. Under
`torch.autocast` (e.g. bf16 on CUDA) only the matrix products run in the autocast dtype.

Tensors inside the layers are time-major ([T, B, ·]) so each step's slice is contiguous; `CharLSTM`
takes and returns batch-major tensors ([B, T]) like the data pipeline produces.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import first_line

State = Tuple[Tensor, Tensor]

__all__ = [
    "CharLSTM",
    "LSTMLayer",
    "LSTMWindow",
    "State",
    "compile_available",
    "detach_state",
    "lstm_cell",
    "lstm_layer_fast",
    "lstm_layer_reference",
    "release_buffers",
]

IMPLS = ("fast", "reference")


# ----------------------------------------------------------------------------------------------
# The reference: the equations, one step at a time, under autograd.
# ----------------------------------------------------------------------------------------------


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor) -> State:
    """One step of the cell: (x [B,E], h [B,H], c [B,H]) -> (h', c'). The module docstring's equations."""
    gates = (F.linear(x, weight_ih) + F.linear(h, weight_hh)).to(c.dtype) + bias.to(c.dtype)
    gi, gf, gg, go = gates.chunk(4, dim=1)
    i = torch.sigmoid(gi)
    f = torch.sigmoid(gf)
    g = torch.tanh(gg)
    o = torch.sigmoid(go)
    c_next = f * c + i * g
    h_next = o * torch.tanh(c_next)
    return h_next, c_next


def lstm_layer_reference(
    x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """A layer over a window, step by step: x [T,B,E], h0/c0 [B,H] -> (y [T,B,H], h_T, c_T)."""
    h, c = h0, c0
    ys = []
    for t in range(x.shape[0]):
        h, c = lstm_cell(x[t], h, c, weight_ih, weight_hh, bias)
        ys.append(h)
    return torch.stack(ys), h, c


# ----------------------------------------------------------------------------------------------
# The fast layer: whole-window Function with a hand-written backward.
# ----------------------------------------------------------------------------------------------


def _fwd_pointwise_eager(gates: Tensor, c_prev: Tensor, c_out: Tensor, tc_out: Tensor, h_out: Tensor) -> None:
    """In place: gates (pre-activations [B,4H]) become the activations; writes c', tanh(c'), h'."""
    hid = c_prev.shape[1]
    gates[:, : 2 * hid].sigmoid_()  # i, f
    gates[:, 2 * hid : 3 * hid].tanh_()  # g
    gates[:, 3 * hid :].sigmoid_()  # o
    i, f, g, o = gates.chunk(4, dim=1)
    torch.mul(f, c_prev, out=c_out)
    c_out.addcmul_(i, g)
    torch.tanh(c_out, out=tc_out)
    torch.mul(o, tc_out, out=h_out)


def _fwd_pointwise_functional(gates: Tensor, c_prev: Tensor, c_out: Tensor, tc_out: Tensor, h_out: Tensor) -> None:
    """The same as `_fwd_pointwise_eager`, written for torch.compile to fuse into one kernel."""
    gi, gf, gg, go = gates.chunk(4, dim=1)
    i = torch.sigmoid(gi)
    f = torch.sigmoid(gf)
    g = torch.tanh(gg)
    o = torch.sigmoid(go)
    c = f * c_prev + i * g
    tc = torch.tanh(c)
    gates.copy_(torch.cat([i, f, g, o], dim=1))
    c_out.copy_(c)
    tc_out.copy_(tc)
    h_out.copy_(o * tc)


def _bwd_pointwise_eager(
    act: Tensor, tc: Tensor, c_prev: Tensor, dh: Tensor, dc: Tensor, dgates: Tensor, tmp: Tensor, ones: Tensor
) -> None:
    """In place: from dh_t and dc (= dc_{t+1} f_{t+1}) write dgates_t and leave dc_{t-1} = dc_t f_t in dc.

    `tmp` is scratch of the gates' shape [B,4H], `ones` a [B,H] tensor of ones. 11 in-place ops.
    """
    hid = dh.shape[1]
    i, f, g, o = act.chunk(4, dim=1)
    di, df, dg, do = dgates.chunk(4, dim=1)
    # the activations' derivatives: s - s^2 for i, f, o; 1 - g^2 for g
    torch.addcmul(act, act, act, value=-1.0, out=tmp)
    torch.addcmul(ones, g, g, value=-1.0, out=tmp[:, 2 * hid : 3 * hid])
    # dc_t = dc + dh * (o - o tanh^2(c_t)); `df` serves as scratch before it is written
    torch.mul(tc, tc, out=df)
    torch.addcmul(o, o, df, value=-1.0, out=df)
    dc.addcmul_(dh, df)
    torch.mul(dh, tc, out=do)
    torch.mul(dc, g, out=di)
    torch.mul(dc, c_prev, out=df)
    torch.mul(dc, i, out=dg)
    dgates.mul_(tmp)
    dc.mul_(f)


def _bwd_pointwise_functional(
    act: Tensor, tc: Tensor, c_prev: Tensor, dh: Tensor, dc: Tensor, dgates: Tensor, tmp: Tensor, ones: Tensor
) -> None:
    """The same as `_bwd_pointwise_eager`, written for torch.compile to fuse into one kernel."""
    i, f, g, o = act.chunk(4, dim=1)
    dct = dc + dh * o * (1 - tc * tc)
    di = dct * g * i * (1 - i)
    df = dct * c_prev * f * (1 - f)
    dg = dct * i * (1 - g * g)
    do = dh * tc * o * (1 - o)
    dgates.copy_(torch.cat([di, df, dg, do], dim=1))
    dc.copy_(dct * f)


_COMPILED: dict = {}
_COMPILE_FAILED = False
_COMPILE_FWD: Optional[bool] = None  # None: compile the forward step on CUDA only (see _pointwise_fns)
_COMPILE_BWD = True


def compile_available() -> bool:
    """False once compiling the pointwise step has failed in this process (then eager is used)."""
    return not _COMPILE_FAILED


def _compiled(name: str, fn):
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[name]


def _pointwise_fns(use_compile: bool, device_type: str):
    """(forward step, backward step) pointwise functions, None meaning the inline eager ops.

    Compiled ones are tried on first call. On CPU only the backward step is compiled: inductor's CPU
    kernels compute exp/tanh with 1-ulp vector math that measured 2-3x slower than ATen's eager
    sigmoid_/tanh_ on these sizes, while the backward (11 eager ops, no transcendentals) fuses into
    one loop. On CUDA both are compiled (each eager op would be a kernel launch).
    """
    if use_compile and not _COMPILE_FAILED:
        compile_fwd = _COMPILE_FWD if _COMPILE_FWD is not None else device_type != "cpu"
        return (
            _guarded("fwd", _fwd_pointwise_functional, _fwd_pointwise_eager) if compile_fwd else None,
            _guarded("bwd", _bwd_pointwise_functional, _bwd_pointwise_eager) if _COMPILE_BWD else None,
        )
    return None, None


def _guarded(name: str, functional, eager):
    def call(*args):
        global _COMPILE_FAILED
        if not _COMPILE_FAILED:
            try:
                return _compiled(name, functional)(*args)
            except Exception as exc:  # no working compiler (no C++ toolchain, no Triton, ...)
                _COMPILE_FAILED = True
                warnings.warn(
                    f"torch.compile of the LSTM pointwise step failed ({type(exc).__name__}: "
                    f"{first_line(exc)}); using eager pointwise ops",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return eager(*args)

    return call


class _BufferPool:
    """Reuse of the big per-window buffers (gates, states, their gradients) on CPU.

    A fresh CPU tensor of tens of MB comes from mmap and is page-faulted in on first touch: measured
    ~50 ms per 67 MB here, i.e. a sixth of a whole training window at the default shape. The pool keeps
    such buffers and hands out *views* of them; a buffer is handed out again only when nothing else
    holds its storage (no saved tensor, no output, no view: storage use count back to the pool's own),
    so reuse can never alias live data. CUDA's caching allocator already does this, so CUDA (and any
    torch without the use-count hook) gets plain `torch.empty`.
    """

    MAX_BYTES = 4 << 30  # beyond this, allocate without pooling
    MIN_BYTES = 1 << 20  # small tensors come from the allocator's normal path

    def __init__(self) -> None:
        self._free: dict = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self._use_count = getattr(torch._C, "_storage_Use_Count", None)
        self._base = self._count(torch.empty(1)) if self._use_count is not None else None

    def _count(self, t: Tensor) -> int:
        return self._use_count(t.untyped_storage()._cdata)

    def empty(self, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if device.type != "cpu" or self._use_count is None or nbytes < self.MIN_BYTES:
            return torch.empty(shape, dtype=dtype, device=device)
        key = (tuple(shape), dtype)
        with self._lock:
            bufs = self._free.setdefault(key, [])
            for buf in bufs:
                if self._count(buf) <= self._base:
                    return buf.view(shape)  # a new view: counts as a user of the storage
            buf = torch.empty(shape, dtype=dtype, device=device)
            if self._bytes + nbytes <= self.MAX_BYTES:
                bufs.append(buf)
                self._bytes += nbytes
            return buf.view(shape)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._bytes = 0


_POOL = _BufferPool()


def release_buffers() -> None:
    """Drop the CPU buffers kept for reuse between windows (their memory returns when unused)."""
    _POOL.clear()


def _lowp_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The matmul dtype autocast asks for on this device, or None outside autocast."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _mkl_packed_ops():
    """MKL's packed-weight GEMM (torch.ops.mkl, what inductor uses for fp32 linear on CPU), or None."""
    if not _USE_MKL_PACKED or not torch._C.has_mkl:
        return None
    try:
        return torch.ops.mkl._mkl_reorder_linear_weight, torch.ops.mkl._mkl_linear
    except (AttributeError, RuntimeError):
        return None


_USE_MKL_PACKED = True


def _forward_loop(gates: Tensor, hs: Tensor, cs: Tensor, tcs: Tensor, weight_hh: Tensor, mm, fwd_pw) -> None:
    """The recurrence. gates [T,B,4H] holds x W^T + b; on return it holds the activations (i, f, g, o).

    hs/cs [T+1,B,H] (index 0 = the initial state), tcs [T,B,H] = tanh(c_t), weight_hh U [4H,H].
    With `fwd_pw` None the pointwise step is inline eager in-place ops on views made once per window
    (unbind), which costs less Python per step than slicing.
    """
    hid = hs.shape[2]
    batch = hs.shape[1]
    g_t, h_t, c_t, tc_t = gates.unbind(0), hs.unbind(0), cs.unbind(0), tcs.unbind(0)
    packed = _mkl_packed_ops() if (mm is None and gates.device.type == "cpu" and gates.dtype == torch.float32) else None
    if packed is not None:
        # U packed once per window; each step's product then skips MKL's per-call packing of U
        reorder, linear = packed
        u = weight_hh.to(gates.dtype).contiguous()  # [4H,H] is already the "linear weight" layout
        u_packed = reorder(u, batch)

        def recurrent(t: int) -> None:
            g_t[t].add_(linear(h_t[t], u_packed, u, None, batch))

    elif mm is None:
        u_t = weight_hh.to(gates.dtype).t().contiguous()  # [H,4H]: h @ U^T as a plain NN product

        def recurrent(t: int) -> None:
            g_t[t].addmm_(h_t[t], u_t)

    else:
        u_t = weight_hh.to(mm).t().contiguous()

        def recurrent(t: int) -> None:
            g_t[t].add_(torch.mm(h_t[t].to(mm), u_t))

    if fwd_pw is not None:
        for t in range(gates.shape[0]):
            recurrent(t)
            fwd_pw(g_t[t], c_t[t], c_t[t + 1], tc_t[t], h_t[t + 1])
        return
    if_t = gates[:, :, : 2 * hid].unbind(0)  # i and f: one sigmoid over both
    i_t = gates[:, :, :hid].unbind(0)
    f_t = gates[:, :, hid : 2 * hid].unbind(0)
    gg_t = gates[:, :, 2 * hid : 3 * hid].unbind(0)
    o_t = gates[:, :, 3 * hid :].unbind(0)
    for t in range(gates.shape[0]):
        recurrent(t)
        if_t[t].sigmoid_()
        gg_t[t].tanh_()
        o_t[t].sigmoid_()
        c = c_t[t + 1]
        torch.mul(f_t[t], c_t[t], out=c)
        c.addcmul_(i_t[t], gg_t[t])
        torch.tanh(c, out=tc_t[t])
        torch.mul(o_t[t], tc_t[t], out=h_t[t + 1])


def _backward_loop(
    gates: Tensor, cs: Tensor, tcs: Tensor, dy: Tensor, dc: Tensor, dgates: Tensor, u: Tensor, mm, bwd_pw
) -> None:
    """The reverse recurrence: fills dgates [T,B,4H] (gradient of the pre-activations); dc [B,H] goes
    from dc_T to dc_{-1} in place. `u` is U ([4H,H], in the matmul dtype)."""
    steps, batch, four_h = gates.shape
    hid = four_h // 4
    dh = torch.empty(batch, hid, device=dy.device, dtype=dy.dtype)
    tmp = torch.empty(batch, four_h, device=dy.device, dtype=dy.dtype)
    ones = torch.ones(batch, hid, device=dy.device, dtype=dy.dtype)
    a_t, c_t, tc_t, dy_t, dg_t = gates.unbind(0), cs.unbind(0), tcs.unbind(0), dy.unbind(0), dgates.unbind(0)
    if bwd_pw is None:
        i_t = gates[:, :, :hid].unbind(0)
        f_t = gates[:, :, hid : 2 * hid].unbind(0)
        gg_t = gates[:, :, 2 * hid : 3 * hid].unbind(0)
        o_t = gates[:, :, 3 * hid :].unbind(0)
        di_t = dgates[:, :, :hid].unbind(0)
        df_t = dgates[:, :, hid : 2 * hid].unbind(0)
        dgg_t = dgates[:, :, 2 * hid : 3 * hid].unbind(0)
        do_t = dgates[:, :, 3 * hid :].unbind(0)
        tmp_g = tmp[:, 2 * hid : 3 * hid]
    packed = _mkl_packed_ops() if (mm is None and gates.device.type == "cpu" and gates.dtype == torch.float32) else None
    if packed is not None:
        reorder, linear = packed
        u_lin = u.t().contiguous()  # dgates @ U = linear(dgates, U^T)
        u_packed = reorder(u_lin, batch)
    for t in range(steps - 1, -1, -1):
        if t == steps - 1:
            dh.copy_(dy_t[t])
        elif packed is not None:
            torch.add(linear(dg_t[t + 1], u_packed, u_lin, None, batch), dy_t[t], out=dh)
        elif mm is None:
            torch.addmm(dy_t[t], dg_t[t + 1], u, out=dh)
        else:
            torch.add(dy_t[t], torch.mm(dg_t[t + 1].to(mm), u), out=dh)
        if bwd_pw is not None:
            bwd_pw(a_t[t], tc_t[t], c_t[t], dh, dc, dg_t[t], tmp, ones)
            continue
        # the same 11 in-place ops as _bwd_pointwise_eager, on views made once per window
        torch.addcmul(a_t[t], a_t[t], a_t[t], value=-1.0, out=tmp)  # s - s^2
        torch.addcmul(ones, gg_t[t], gg_t[t], value=-1.0, out=tmp_g)  # 1 - g^2
        df = df_t[t]
        torch.mul(tc_t[t], tc_t[t], out=df)
        torch.addcmul(o_t[t], o_t[t], df, value=-1.0, out=df)  # o (1 - tanh^2 c)
        dc.addcmul_(dh, df)
        torch.mul(dh, tc_t[t], out=do_t[t])
        torch.mul(dc, gg_t[t], out=di_t[t])
        torch.mul(dc, c_t[t], out=df)
        torch.mul(dc, i_t[t], out=dgg_t[t])
        dg_t[t].mul_(tmp)
        dc.mul_(f_t[t])


class LSTMWindow(torch.autograd.Function):
    """One layer over one window: (x [T,B,E], h0, c0 [B,H], W, U, b) -> (y [T,B,H], c_T [B,H]).

    h_T is y[-1]. `lowp` is the dtype of the matrix products (None: the state's dtype); `use_compile`
    selects the compiled pointwise step. Backward is derived by hand (see the module docstring).

    In the full-precision path the input gets a column of ones and W a column b ([W | b]), so the one
    input product also adds the bias and, in backward, the one weight product dgates^T [X | 1] also
    gives db as its last column (no separate broadcast copy or column sum over the window).
    """

    @staticmethod
    def forward(ctx, x, h0, c0, weight_ih, weight_hh, bias, lowp, use_compile):  # type: ignore[override]
        fwd_pw, _ = _pointwise_fns(use_compile, x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            acc = c0.dtype
            steps, batch, n_in = x.shape
            hid = weight_hh.shape[1]
            dev = x.device
            mm = lowp if lowp is not None and lowp != acc else None
            gates = _POOL.empty((steps, batch, 4 * hid), acc, dev)
            hs = _POOL.empty((steps + 1, batch, hid), acc, dev)  # hs[0] = h0, hs[t+1] = h_t
            cs = _POOL.empty((steps + 1, batch, hid), acc, dev)  # cs[0] = c0
            tcs = _POOL.empty((steps, batch, hid), acc, dev)  # tanh(c_t)
            hs[0].copy_(h0)
            cs[0].copy_(c0)
            if mm is None:
                # [X | 1], rows unpadded: measured faster for dgates^T [X | 1] than 16-aligned rows
                xa = _POOL.empty((steps * batch, n_in + 1), acc, dev)
                xa[:, :n_in].copy_(x.reshape(steps * batch, n_in))
                xa[:, n_in].fill_(1.0)
                wa = torch.cat([weight_ih.to(acc), bias.to(acc).unsqueeze(1)], dim=1)  # [4H, E+1]
                torch.mm(xa, wa.t(), out=gates.view(steps * batch, 4 * hid))
            else:
                xa = x
                gates.view(steps * batch, -1).copy_(torch.mm(x.reshape(steps * batch, n_in).to(mm), weight_ih.to(mm).t()))
                gates.add_(bias.to(acc))
            _forward_loop(gates, hs, cs, tcs, weight_hh, mm, fwd_pw)
        ctx.save_for_backward(xa, weight_ih, weight_hh, gates, hs, cs, tcs)
        ctx.lowp = mm
        ctx.use_compile = use_compile
        ctx.dtypes = (x.dtype, h0.dtype, weight_ih.dtype, weight_hh.dtype, bias.dtype)
        return hs[1:], cs[steps].clone()

    @staticmethod
    def backward(ctx, dy, dc_last):  # type: ignore[override]
        xa, weight_ih, weight_hh, gates, hs, cs, tcs = ctx.saved_tensors
        _, bwd_pw = _pointwise_fns(ctx.use_compile, dy.device.type)
        mm = ctx.lowp
        x_dtype, h_dtype, wi_dtype, wh_dtype, b_dtype = ctx.dtypes
        need_x, need_h0, need_c0, need_wi, need_wh, need_b = ctx.needs_input_grad[:6]
        dx = dh0 = dw_ih = dw_hh = db = None
        with torch.autocast(dy.device.type, enabled=False):
            acc = gates.dtype
            steps, batch, four_h = gates.shape
            hid = four_h // 4
            n_in = weight_ih.shape[1]
            dy = dy.to(acc)  # may be an expanded view (e.g. from a sum); only read per step
            dgates = _POOL.empty(tuple(gates.shape), acc, gates.device)
            dc = dc_last.to(acc).clone()
            mdt = acc if mm is None else mm
            u = weight_hh.to(mdt)
            _backward_loop(gates, cs, tcs, dy, dc, dgates, u, mm, bwd_pw)
            # the weight gradients: single products over all T*B rows of the window
            dg2 = dgates.view(steps * batch, four_h)
            dg_m = dg2 if mm is None else dg2.to(mm)
            if need_x:
                dx = torch.mm(dg_m, weight_ih.to(mdt)).view(steps, batch, n_in)
            if need_h0:
                dh0 = torch.mm(dg_m[:batch], u)
            if need_wh:
                dw_hh = torch.mm(dg_m.t(), hs[:steps].view(steps * batch, hid).to(mdt))
            if mm is None:
                if need_wi or need_b:
                    # [X | 1]^T dgates = [dW | db]^T ([E+1, 4H]); this operand order measured
                    # 10-15% faster than dgates^T [X | 1] here. dW is handed back as a transposed view.
                    dwa_t = torch.mm(xa.t(), dg2)
                    dw_ih, db = dwa_t[:n_in].t(), dwa_t[n_in]
            else:
                if need_wi:
                    dw_ih = torch.mm(dg_m.t(), xa.reshape(steps * batch, n_in).to(mm))
                if need_b:
                    db = dg2.sum(0)
        cast = lambda g, dt: None if g is None else g.to(dt)  # noqa: E731
        return (
            cast(dx, x_dtype),
            cast(dh0, h_dtype),
            cast(dc, h_dtype) if need_c0 else None,
            cast(dw_ih, wi_dtype) if need_wi else None,
            cast(dw_hh, wh_dtype),
            cast(db, b_dtype) if need_b else None,
            None,
            None,
        )


def lstm_layer_fast(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias: Tensor,
    use_compile: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """A layer over a window with the hand-written backward: x [T,B,E] -> (y [T,B,H], h_T, c_T)."""
    lowp = _lowp_dtype(x.device)
    y, c_last = LSTMWindow.apply(x, h0, c0, weight_ih, weight_hh, bias, lowp, use_compile)
    return y, y[-1], c_last


# ----------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------


class LSTMLayer(nn.Module):
    """One LSTM layer's parameters (layout in the module docstring) and its window forward."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            self.weight_ih.uniform_(-bound, bound)
            self.weight_hh.uniform_(-bound, bound)
            self.bias.zero_()
            self.bias[self.hidden_size : 2 * self.hidden_size].fill_(1.0)  # forget gate

    def forward(self, x: Tensor, h0: Tensor, c0: Tensor, impl: str = "fast", use_compile: bool = False):
        """x [T,B,input_size], h0/c0 [B,H] -> (y [T,B,H], h_T, c_T)."""
        if impl == "fast":
            return lstm_layer_fast(x, h0, c0, self.weight_ih, self.weight_hh, self.bias, use_compile)
        return lstm_layer_reference(x, h0, c0, self.weight_ih, self.weight_hh, self.bias)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


def detach_state(state: Optional[State]) -> Optional[State]:
    """The state cut from the graph (truncated BPTT: the next window does not backprop into this one)."""
    if state is None:
        return None
    return tuple(s.detach() for s in state)  # type: ignore[return-value]


class CharLSTM(nn.Module):
    """Embedding -> `layers` LSTM layers -> linear head to the vocabulary.

    Dropout (p = `dropout`, training only) is applied to each layer's output: between layers and
    before the head, i.e. on every non-recurrent connection above the embedding, never on the
    recurrent (h, c) path (Zaremba et al. 2014). Dropping before the head too is deliberate: with
    one layer, "between layers only" would make the setting a silent no-op.

    state_dict keys (independent of `impl` and `compile`): embed.weight, cells.{k}.weight_ih,
    cells.{k}.weight_hh, cells.{k}.bias, head.weight, head.bias.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding: int,
        hidden: int,
        layers: int,
        dropout: float = 0.0,
        impl: str = "fast",
        compile: bool = False,
    ) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        for name, value in (("vocab_size", vocab_size), ("embedding", embedding), ("hidden", hidden), ("layers", layers)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.vocab_size = int(vocab_size)
        self.embedding_size = int(embedding)
        self.hidden_size = int(hidden)
        self.num_layers = int(layers)
        self.dropout = float(dropout)
        self.impl = impl
        self.compile = bool(compile)
        self.embed = nn.Embedding(self.vocab_size, self.embedding_size)
        self.cells = nn.ModuleList(
            LSTMLayer(self.embedding_size if k == 0 else self.hidden_size, self.hidden_size)
            for k in range(self.num_layers)
        )
        self.head = nn.Linear(self.hidden_size, self.vocab_size)

    @classmethod
    def from_config(cls, model_cfg: Any, vocab_size: int) -> "CharLSTM":
        """Build from any object with attributes embedding, hidden, layers, dropout, impl, compile."""
        return cls(
            vocab_size,
            embedding=model_cfg.embedding,
            hidden=model_cfg.hidden,
            layers=model_cfg.layers,
            dropout=getattr(model_cfg, "dropout", 0.0),
            impl=getattr(model_cfg, "impl", "fast"),
            compile=getattr(model_cfg, "compile", False),
        )

    def init_state(self, batch: int, device: Optional[torch.device | str] = None) -> State:
        """Zeros (h, c), each [layers, batch, hidden], fp32."""
        if device is None:
            device = self.head.weight.device
        shape = (self.num_layers, batch, self.hidden_size)
        return (
            torch.zeros(shape, device=device, dtype=torch.float32),
            torch.zeros(shape, device=device, dtype=torch.float32),
        )

    def forward(self, x: Tensor, state: Optional[State] = None) -> Tuple[Tensor, State]:
        """x [B,T] token ids, state (h, c) [layers,B,H] or None -> (logits [B,T,V], new state)."""
        if x.dim() != 2:
            raise ValueError(f"x must be [batch, time], got shape {tuple(x.shape)}")
        batch = x.shape[0]
        if state is None:
            state = self.init_state(batch, x.device)
        h0, c0 = state
        inp = self.embed(x.t())  # [T,B,E], time-major inside
        hs, cs = [], []
        for k, cell in enumerate(self.cells):
            inp, h_k, c_k = cell(inp, h0[k].float(), c0[k].float(), self.impl, self.compile)
            hs.append(h_k)
            cs.append(c_k)
            if self.dropout > 0.0:  # on each layer's output: between layers and before the head
                inp = F.dropout(inp, self.dropout, self.training)
        logits = self.head(inp).transpose(0, 1).contiguous()
        return logits, (torch.stack(hs), torch.stack(cs))

    @torch.no_grad()
    def step(self, token: Tensor, state: Optional[State] = None) -> Tuple[Tensor, State]:
        """Advance one character (sampling; no autograd, no dropout): token [B] -> (logits [B,V], state)."""
        if state is None:
            state = self.init_state(token.shape[0], token.device)
        h0, c0 = state
        inp = self.embed(token)
        hs, cs = [], []
        for k, cell in enumerate(self.cells):
            h_k, c_k = lstm_cell(inp, h0[k], c0[k], cell.weight_ih, cell.weight_hh, cell.bias)
            hs.append(h_k)
            cs.append(c_k)
            inp = h_k
        return self.head(inp), (torch.stack(hs), torch.stack(cs))
