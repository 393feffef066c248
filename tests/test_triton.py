"""The Triton step kernels (`lstm_dist.model.triton_loops`) without a GPU: run by Triton's interpreter on
the CPU against the eager loops, and compiled for Hopper (sm_90) by Triton's own compiler and ptxas.

The interpreter (`TRITON_INTERPRET=1`, read when a kernel is defined, so it runs in a process of its
own) executes a launch's programs one after another with numpy: right for this kernel, whose programs
never wait for each other. Two of its limits shape the tests: it multiplies bf16 operands wrongly (their
bit patterns, seen on triton 3.9), so the low-precision path (h written in the products' dtype for the
next step) is checked in fp16, which numpy multiplies correctly, and bf16 only compiled; and it accepts
tiles a GPU compiler would reject, so the kernel is also compiled for Hopper at the tiles `tiles()`
picks, and any compile error fails here. `pytest -m triton` selects these.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]' brings it)")

pytestmark = pytest.mark.triton

INTERPRETED = textwrap.dedent(
    """
    import os
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    from lstm_dist.model import loops, triton_loops
    from lstm_dist.model.fast import lstm_layer_fast
    from lstm_dist.model.kernels import Kernels

    torch.manual_seed(0)
    # the forward loop against the eager one: sizes that are not multiples of the 16-wide tiles, one that
    # spans several tiles of streams and units, and the low-precision path (fp16 products, h written in fp16)
    for steps, batch, hid, mm in ((3, 3, 20, None), (2, 17, 33, None), (3, 5, 20, torch.float16)):
        gates = torch.randn(steps, batch, 4 * hid)
        u = torch.randn(4 * hid, hid) * hid ** -0.5
        hs, cs = torch.zeros(steps + 1, batch, hid), torch.zeros(steps + 1, batch, hid)
        hs[0], cs[0] = torch.randn(batch, hid) * 0.5, torch.randn(batch, hid) * 0.5
        ours, eager = [gates.clone(), hs.clone(), cs.clone()], [gates.clone(), hs.clone(), cs.clone()]
        triton_loops.triton_forward(*ours, u, mm, Kernels("eager"))
        loops.eager_forward(*eager, u, mm, Kernels("eager"))
        tol = 1e-6 if mm is None else 2e-3
        for name, a, b in zip(("activations", "h", "c"), ours, eager):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"{name} at {(steps, batch, hid, mm)}")
    print("FORWARD_OK")

    # the backward loop against the eager one, on the activations that forward wrote: dgates and dc
    for steps, batch, hid, mm in ((3, 3, 20, None), (2, 17, 33, None), (3, 5, 20, torch.float16)):
        gates = torch.randn(steps, batch, 4 * hid)
        u = torch.randn(4 * hid, hid) * hid ** -0.5
        hs, cs = torch.zeros(steps + 1, batch, hid), torch.zeros(steps + 1, batch, hid)
        hs[0], cs[0] = torch.randn(batch, hid) * 0.5, torch.randn(batch, hid) * 0.5
        loops.eager_forward(gates, hs, cs, u, None, Kernels("eager"))
        dy = torch.randn(steps, batch, hid)
        outs = []
        for run in (triton_loops.triton_backward, loops.eager_backward):
            dc, dgates = torch.randn(batch, hid, generator=torch.Generator().manual_seed(3)), torch.empty(steps, batch, 4 * hid)
            run(gates, hs, cs, dy, dc, dgates, u, mm, Kernels("eager"))
            outs.append((dgates, dc))
        tol = 1e-6 if mm is None else 2e-3
        for name, a, b in zip(("dgates", "dc"), *outs):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"{name} at {(steps, batch, hid, mm)}")
    print("BACKWARD_OK")

    # the whole layer as the kernel table runs it (both directions in Triton) against the eager
    # loops over two carried windows: values, the carried state and every gradient
    steps, batch, inp, hid = 4, 5, 6, 20
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(4 * hid, inp, generator=g) * 0.3, torch.randn(4 * hid, hid, generator=g) * 0.3,
         torch.randn(4 * hid, generator=g) * 0.1]
    xs = [torch.randn(steps, batch, inp, generator=g) for _ in range(2)]
    h0, c0 = torch.randn(batch, hid, generator=g) * 0.5, torch.randn(batch, hid, generator=g) * 0.5
    runs = []
    for kernels in (Kernels("triton", force=True), Kernels("eager")):
        leaves = [t.clone().requires_grad_(True) for t in (*w, h0, c0)]
        weight_ih, weight_hh, bias, h, c = leaves
        total = 0
        for x in xs:
            y, h, c = lstm_layer_fast(x, h, c, weight_ih, weight_hh, bias, kernels)
            total = total + y.pow(2).sum() + c.sin().sum()
        total.backward()
        runs.append([y, h, c] + [t.grad for t in leaves])
    names = ["y", "h_T", "c_T", "dW_ih", "dW_hh", "db", "dh0", "dc0"]
    for name, a, b in zip(names, *runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    # and against torch.nn.LSTM (one bias: ours as bias_ih, zero bias_hh) on the first window
    ref = torch.nn.LSTM(inp, hid)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(w[0]); ref.weight_hh_l0.copy_(w[1]); ref.bias_ih_l0.copy_(w[2]); ref.bias_hh_l0.zero_()
        y_ref, _ = ref(xs[0], (h0[None], c0[None]))
        y_ours, _, _ = lstm_layer_fast(xs[0], h0, c0, *w, Kernels("triton", force=True))
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-5, msg="y against torch.nn.LSTM")
    print("LAYER_OK")

    # in CUDA graphs (model.cuda_graphs): on the CPU the bookkeeping runs and a "replay" runs the recorded
    # Triton loops again on the set's static buffers; warm-up, capture and replays against the eager layer
    from lstm_dist.model import graphs
    graphed = Kernels("triton", force=True, graphs=True)
    mine, theirs = [t.clone().requires_grad_(True) for t in w], [t.clone().requires_grad_(True) for t in w]
    for k in range(graphs.WARMUP + 2):
        outs = []
        for kernels, leaves in ((graphed, mine), (Kernels("eager"), theirs)):
            y, h, c = lstm_layer_fast(xs[k % 2], h0, c0, *leaves, kernels)
            (y.pow(2).sum() + c.sin().sum()).backward()
            outs.append([y.detach().clone()] + [t.grad.clone() for t in leaves])
            for t in leaves:
                t.grad = None
            del y, h, c  # the window's output holds its set
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"window {k} in graphs")
    (only,) = graphs.SETS.all()
    assert (only.forward_phase.replayed, only.backward_phase.replayed) == (2, 2)
    print("GRAPHS_OK")

    # the start-up probe that decides whether a run may take this path (on CUDA in bf16; here in fp16)
    assert triton_loops.probe(torch.device("cpu"), 3, 20, torch.float16) is None
    print("PROBE_OK")
    """
)


@pytest.mark.slow
def test_the_interpreted_kernel_computes_what_the_eager_loops_compute(tmp_path):
    """Run by Triton's interpreter on the CPU: the forward loop against the eager loop (activations,
    h, c; ragged tiles; fp16 products), the backward loop likewise (dgates, dc), and the layer (both
    directions in Triton) against the eager layer over two carried windows, values and every gradient,
    and against torch.nn.LSTM; then in CUDA graphs' bookkeeping (warm-up, capture, replays)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT),
           "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))}
    proc = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["FORWARD_OK", "BACKWARD_OK", "LAYER_OK", "GRAPHS_OK", "PROBE_OK"], proc.stdout


@pytest.mark.parametrize("operands,precision,batch,hidden", [
    ("fp32", "tf32", 128, 2048),   # the fp32 path at the cluster shape's tiles (TF32 products)
    ("bf16", "ieee", 128, 2048),   # the cluster config's path: bf16 products, h written in bf16
    ("fp32", "ieee", 3, 20),       # the smallest tiles (16), fp32 products
])
def test_the_kernel_compiles_for_hopper(operands, precision, batch, hidden):
    """Triton's compiler and ptxas build the kernel for sm_90 (an H100/H200) here, without a GPU, at the
    tiles the wrapper picks for the shape: a tile or an op that only the interpreter accepts fails here."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lstm_dist.model import triton_loops

    op = f"*{operands}"
    ints = ("B", "H", "stride_h", "stride_uk", "stride_un", "stride_g", "stride_c", "stride_hout", "stride_low")
    signature = {"h_ptr": op, "u_ptr": op, "gates_ptr": "*fp32", "c_prev_ptr": "*fp32", "c_ptr": "*fp32",
                 "h_out_ptr": "*fp32", "h_low_ptr": op if operands == "bf16" else "*fp32",
                 **{name: "i32" for name in ints},
                 **{name: "constexpr" for name in ("BLOCK_B", "BLOCK_H", "BLOCK_K", "WRITE_LOW", "PRECISION")}}
    block_b, block_h, block_k = triton_loops.tiles(batch, hidden)
    constants = {"BLOCK_B": block_b, "BLOCK_H": block_h, "BLOCK_K": block_k, "WRITE_LOW": operands == "bf16",
                 "PRECISION": precision}
    compiled = triton.compile(ASTSource(fn=triton_loops.lstm_forward_step, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]
    if precision == "tf32" or operands == "bf16":  # tensor-core products (wgmma / mma), not a scalar loop
        assert "mma" in compiled.asm["ptx"]


@pytest.mark.parametrize("operands,precision,batch,hidden", [
    ("fp32", "tf32", 128, 2048),
    ("bf16", "ieee", 128, 2048),   # the cluster config's path: dgates_{t+1} and U in bf16, dgates_t also written in bf16
    ("fp32", "ieee", 3, 20),
])
def test_the_backward_kernel_compiles_for_hopper(operands, precision, batch, hidden):
    """As above, for the reverse step (the product over 4H columns, then the pointwise gradient)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lstm_dist.model import triton_loops

    op = f"*{operands}"
    ints = ("B", "H", "stride_dgn", "stride_uk", "stride_dy", "stride_coef", "stride_dcc", "stride_f", "stride_dc",
            "stride_dg", "stride_low")
    signature = {"dg_next_ptr": op, "u_ptr": op, "dy_ptr": "*fp32", "coef_ptr": "*fp32", "dc_coef_ptr": "*fp32",
                 "f_ptr": "*fp32", "dc_ptr": "*fp32", "dg_ptr": "*fp32", "dg_low_ptr": op if operands == "bf16" else "*fp32",
                 **{name: "i32" for name in ints},
                 **{name: "constexpr" for name in ("BLOCK_B", "BLOCK_H", "BLOCK_K", "HAS_NEXT", "WRITE_LOW", "PRECISION")}}
    block_b, block_h, _ = triton_loops.tiles(batch, hidden)
    constants = {"BLOCK_B": block_b, "BLOCK_H": block_h, "BLOCK_K": 64, "HAS_NEXT": True,
                 "WRITE_LOW": operands == "bf16", "PRECISION": precision}
    compiled = triton.compile(ASTSource(fn=triton_loops.lstm_backward_step, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]
    if precision == "tf32" or operands == "bf16":
        assert "mma" in compiled.asm["ptx"]
