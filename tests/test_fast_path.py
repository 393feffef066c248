"""The fast path's inner loop: how many operations one time step costs, and that it never waits on the host.

The time loop runs B·H-sized ops one after another, so at the shapes users train a step's cost is
mostly the number of ops in it (each is a dispatch, and on CUDA a kernel launch). These tests count
what actually reaches the dispatcher for one step, forward and backward, so that a change adding
work to the loop fails here rather than showing up weeks later as a slower benchmark.

At the end, the C++ loops' build (`lstm_dist.model.cpu_loops`): one per version of everything that makes
the binary, announced while it is built or waited for, never another version's. These reuse the
suite's one build (about 30 s) rather than build again.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT

from lstm_dist.model import loops, products
from lstm_dist.model.fast import lstm_layer_fast
from lstm_dist.model.kernels import Kernels
from test_model import every_site, kernels_here

# Ops that make the host wait for the device (a value read back, a data-dependent shape or branch).
HOST_SYNC_OPS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default",
                 "aten.nonzero.default", "aten.equal.default", "aten.allclose.default", "aten.masked_select.default",
                 "aten.unique.default", "aten._unique2.default"}


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_window(steps: int, kernels: Kernels, bf16: bool = False) -> tuple[Counter, Counter]:
    """Ops dispatched by the forward and by the backward of one layer over one window, run by `kernels`."""
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.5).requires_grad_(True)  # noqa: E731
    batch, inp, hid = 3, 5, 8
    x, w, u, b = mk(steps, batch, inp), mk(4 * hid, inp), mk(4 * hid, hid), mk(4 * hid)
    h0, c0 = mk(batch, hid), mk(batch, hid)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        with CountOps() as fwd:
            y, h, c = lstm_layer_fast(x, h0, c0, w, u, b, kernels)
        loss = y.float().pow(2).sum() + c.sum()
    with CountOps() as bwd:
        loss.backward()
    assert x.grad is not None and u.grad is not None and h0.grad is not None
    return fwd.ops, bwd.ops


def per_step(short: Counter, long: Counter, extra_steps: int) -> dict[str, float]:
    return {op: (long[op] - short[op]) / extra_steps for op in long if long[op] != short[op]}


# (recurrent product path, autocast) -> (forward ops per step, backward ops per step). The pointwise
# cell update is 7 ops forward and 6 backward; the recurrent product adds 2 with MKL's packed GEMM
# (product, add), 1 with addmm, and 3 under autocast (cast, low-precision product, add).
BUDGET = {("mkl_packed", False): (9, 8), ("onednn", False): (9, 8), ("onednn_packed", False): (9, 8),
          ("blas", False): (8, 7), ("blas", True): (10, 9)}


@pytest.mark.parametrize("product,bf16", list(BUDGET), ids=[f"{p}{'-bf16' if b else ''}" for p, b in BUDGET])
def test_one_time_step_costs_no_more_ops_than_its_budget(product, bf16):
    if not products.usable(product):
        pytest.skip(f"this torch has no {product} product")
    # the eager loops: the definition, and what runs wherever another entry's loops do not
    kernels = Kernels("eager", products=every_site(product))
    f4, b4 = count_window(4, kernels, bf16)
    f8, b8 = count_window(8, kernels, bf16)
    fwd, bwd = per_step(f4, f8, 4), per_step(b4, b8, 4)
    budget_fwd, budget_bwd = BUDGET[(product, bf16)]
    assert sum(fwd.values()) <= budget_fwd, f"forward step: {fwd}"
    assert sum(bwd.values()) <= budget_bwd, f"backward step: {bwd}"
    # and no op of the cell update allocates per step: each writes into a buffer made per window
    # (the recurrent product's own output, MKL's or the bf16 mm's, is the one allocation a step makes)
    assert not any(op.startswith(("aten.empty", "aten.zeros", "aten.clone", "aten.cat")) for op in {**fwd, **bwd}), (fwd, bwd)


@pytest.mark.parametrize("product", products.IMPLS)
def test_the_cpp_loops_dispatch_only_the_recurrent_product_per_step(product):
    """The C++ loops (fp32 CPU) fuse the cell update: per step only the step's two slices and its
    recurrent product reach the dispatcher (MKL's packed GEMM or oneDNN's inner product, whose add is
    done in the row pass, or one addmm), the product the implementation names; the backward's
    coefficients are computed in its row pass, no op of their own per window."""
    if not products.usable(product):
        pytest.skip(f"this torch has no {product} product")
    kernels = kernels_here("cpp_loops", products=every_site(product))
    f4, b4 = count_window(4, kernels)
    f8, b8 = count_window(8, kernels)
    fwd, bwd = per_step(f4, f8, 4), per_step(b4, b8, 4)
    assert sum(fwd.values()) <= 3 and sum(bwd.values()) <= 3, (fwd, bwd)
    op = {"blas": "aten.addmm.out", "mkl_packed": "mkl._mkl_linear.default"}.get(product, "mkldnn._linear_pointwise.default")
    assert op in fwd and op in bwd, (fwd, bwd)
    assert set(fwd) | set(bwd) <= {"aten.select.int", op}, (fwd, bwd)
    assert not any(name.startswith(("aten.addcmul", "aten.tanh")) for name in b8), b8  # no coefficient pass


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", ["eager", "cpp_loops"])
def test_no_host_synchronisation_in_a_window(name, bf16):
    """No op that reads a value back to the host, anywhere in forward or backward of a window: inside
    the time loop such an op would stall the CUDA stream at every step. (The compiled steps: the CUDA
    test with torch's sync debug mode, tests/test_model.py.)"""
    fwd, bwd = count_window(6, kernels_here(name), bf16)
    assert not (set(fwd) | set(bwd)) & HOST_SYNC_OPS, sorted((set(fwd) | set(bwd)) & HOST_SYNC_OPS)


def test_the_op_counter_sees_a_host_sync_and_an_extra_op():
    """The two tests above can fail: an .item() in the loop and one more op per step are both caught."""
    original = loops._bwd_eager

    def with_a_sync(dh, dc, *views):
        original(dh, dc, *views)
        if dc.abs().max().item() > 1e9:  # a data-dependent branch per step
            dc.zero_()

    mp = pytest.MonkeyPatch()
    mp.setattr(loops, "_bwd_eager", with_a_sync)
    try:  # against the eager loops' budget
        f4, b4 = count_window(4, Kernels("eager"))
        f8, b8 = count_window(8, Kernels("eager"))
    finally:
        mp.undo()
    bwd = per_step(b4, b8, 4)
    assert "aten._local_scalar_dense.default" in bwd
    assert sum(bwd.values()) > BUDGET[("blas", False)][1]  # Kernels("eager") runs BLAS's products


@pytest.mark.slow
def test_each_shape_compiles_its_own_forward_step_into_one_kernel(monkeypatch):
    """The compiled forward step writes outputs of one size, so inductor makes one kernel of it (its CPU
    backend here; the GPU's count is gpu_check's `window` profile); and each shape gets a code object
    of its own, so with dynamo's recompile limit at 1 two shapes still both compile: before, the second
    shape was a recompile of the one function and would have hit the limit, dropping to eager."""
    import torch._inductor.metrics as metrics

    # torch's own config.patch, not monkeypatch: its undo (delattr where it saw no old value) once left a
    # later compile in the same xdist worker without `recompile_limit` ("does not exist")
    stack = contextlib.ExitStack()
    stack.enter_context(torch._dynamo.config.patch(recompile_limit=1))
    stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))  # a cache hit generates no kernel to count
    monkeypatch.setattr(loops, "_COMPILED", {})
    monkeypatch.setattr(loops, "_COMPILE_FAILURE", None)
    metrics.reset()
    with stack:
        _compile_two_shapes()
    assert loops.compile_available(), loops.compile_failure()
    assert len(loops._COMPILED) == 2 and metrics.generated_kernel_count == 2  # one kernel per shape


def _compile_two_shapes() -> None:
    for batch, hid in ((2, 4), (3, 4)):
        gates, c0 = torch.randn(batch, 4 * hid), torch.randn(batch, hid)
        c, h = torch.empty(batch, hid), torch.empty(batch, hid)
        loops._compiled_or_eager(loops._fwd_pointwise, lambda t: (gates, c0, c, h))(0)
        i, f, g, o = gates.chunk(4, dim=1)
        want_c = torch.sigmoid(f) * c0 + torch.sigmoid(i) * torch.tanh(g)
        torch.testing.assert_close(c, want_c)
        torch.testing.assert_close(h, torch.sigmoid(o) * torch.tanh(want_c))


# ---------------------------------------------------------------- the C++ loops' build: one per version


def test_the_cpp_loops_build_is_keyed_by_everything_that_makes_the_binary(tmp_path, monkeypatch):
    """Each input of the binary (source text, a flag, the compiler, torch's version, Python's ABI) gives
    the build another name and directory, so two versions never share (and rebuild) one; the same
    inputs give the same name, so every checkout of one version shares one build."""
    from types import SimpleNamespace

    from lstm_dist.model import cpu_loops as L

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    text = L.SOURCE.read_bytes()
    base = L.build_inputs(text)
    assert L.build_inputs() == base and L.build_name(dict(reversed(base.items()))) == L.build_name(base)
    assert L.build_directory(base) == tmp_path / L.build_name(base)
    changed = {"source text": L.build_inputs(text.replace(b"\n", b"\n\n", 1))}
    with monkeypatch.context() as m:
        m.setattr(L, "CFLAGS", (*L.CFLAGS, "-ffast-math"))
        changed["a flag"] = L.build_inputs(text)
    with monkeypatch.context() as m:
        m.setenv("CXX", "clang++")
        changed["the compiler"] = L.build_inputs(text)
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "2.99.0+cpu")
        changed["torch's version"] = L.build_inputs(text)
    with monkeypatch.context() as m:
        m.setattr(sys, "implementation", SimpleNamespace(**{**vars(sys.implementation), "cache_tag": "cpython-399"}))
        changed["Python's ABI"] = L.build_inputs(text)
    names = {what: L.build_name(inputs) for what, inputs in changed.items()}
    assert len({L.build_name(base), *names.values()}) == 1 + len(names), names
    dirs = {L.build_directory(inputs) for inputs in changed.values()}
    assert len(dirs) == len(changed) and L.build_directory(base) not in dirs
    assert all(d.parent == tmp_path and d.name.startswith("lstm_dist_loops_") for d in dirs)


def test_a_cpp_loops_build_in_progress_is_announced_and_another_versions_never_loaded(tmp_path, monkeypatch, capfd):
    """The real loader, against a cache where another process is building this version (its directory
    without the module yet, under a held `lock`): a process of this version says in one line that it
    waits, then loads that build once it is linked and the lock released; another source version,
    loaded meanwhile, neither waits on that lock nor loads that build: it announces its own build in
    its own directory (which fails at once here, the compiler missing, so that the test takes
    seconds) and runs the eager loops."""
    from lstm_dist.model import cpu_loops as L

    if L.get() is None:
        pytest.skip(f"the C++ loops cannot be built here ({L.failure()})")
    built = Path(L.get().__file__).parent  # the suite's build of this version, in the default cache
    cache = tmp_path / "ext"
    ours = cache / built.name
    so = ours / (built.name + ".so")
    shutil.copytree(built, ours, ignore=shutil.ignore_patterns(so.name))  # all but the module, not linked yet
    (ours / "lock").touch()
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "CXX")}
    env.update(TORCH_EXTENSIONS_DIR=str(cache), PYTHONPATH=str(ROOT))
    script = textwrap.dedent(
        """
        from lstm_dist.model import cpu_loops
        m = cpu_loops.get()
        print("LOADED", m.__file__ if m else None, cpu_loops.failure())
        with open("/proc/self/maps") as maps:  # the shared objects this process has mapped
            print("MAPPED", sorted({line.split()[-1] for line in maps if "lstm_dist_loops" in line}))
        """
    )
    same = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        said: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [said.put(line) for line in same.stderr], daemon=True).start()

        # meanwhile, in this process: another version of the source (a fresh get(), as in a new process)
        other_source = tmp_path / "v2" / L.SOURCE.name
        other_source.parent.mkdir()
        other_source.write_bytes(L.SOURCE.read_bytes() + b"\n// another version of the loops\n")
        for name, value in (("SOURCE", other_source), ("_tried", False), ("_module", None), ("_failure", None)):
            monkeypatch.setattr(L, name, value)
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        capfd.readouterr()
        other = threading.Thread(target=L.get, daemon=True)
        other.start()
        other.join(timeout=60)
        assert not other.is_alive(), "another source version waits on this version's build (its lock)"
        assert L.get() is None and "Error" in L.failure(), L.failure()
        announced = [line for line in capfd.readouterr().err.splitlines() if "C++ LSTM loops" in line]
        assert len(announced) == 1 and announced[0].startswith("building the C++ LSTM loops (once per source "
                                                               "version, ~30 s; "), announced
        its_dir = Path(announced[0].rsplit(" in ", 1)[1])
        assert its_dir.parent == cache and its_dir != ours
        assert (its_dir / L.SOURCE.name).read_bytes() == other_source.read_bytes()
        with open("/proc/self/maps") as maps:
            assert str(so) not in maps.read()

        waiting = said.get(timeout=60).rstrip("\n")
        assert same.poll() is None, "the process of this version did not wait for the build in progress"
        assert waiting == (f"waiting for another process building the C++ LSTM loops (once per source version, "
                           f"~30 s) in {ours}; if none is, remove {ours / 'lock'}")
        shutil.copy2(built / so.name, so)  # the other process's build is done: the module linked,
        (ours / "lock").unlink()  # and the lock released
        out, _ = same.communicate(timeout=60)
    finally:
        same.kill()
        (ours / "lock").unlink(missing_ok=True)
    assert same.returncode == 0 and said.empty(), (out, list(said.queue))
    assert out.splitlines() == [f"LOADED {so} None", f"MAPPED {[str(so)]}"]
