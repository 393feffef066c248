"""The CPU matrix products chosen by measurement (`lstm_dist.model.products`): each implementation
computes the same product, the measurement and its cache per machine, the agreement of ranks, the
forced setting, the record a checkpoint keeps and its reuse on resume."""

from __future__ import annotations

import json

import pytest
import torch

from lstm_dist.model import products
from lstm_dist.model.products import CpuProducts, Linear, Shape


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LSTM_DIST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "cpu_matmul.json"


@pytest.mark.parametrize("impl", products.IMPLS)
@pytest.mark.parametrize("contiguous", [True, False], ids=["M", "view"])
def test_every_implementation_computes_add_plus_x_m(impl, contiguous):
    if not products.usable(impl):
        pytest.skip(f"this torch has no {impl} product")
    g = torch.Generator().manual_seed(0)
    x, add = torch.randn(5, 7, generator=g), torch.randn(5, 11, generator=g)
    m = torch.randn(7, 11, generator=g) if contiguous else torch.randn(11, 7, generator=g).t()
    lin = Linear(impl, m, 5)
    out = torch.empty(5, 11)
    assert lin(x, add, out) is out
    torch.testing.assert_close(out, add + x @ m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin(x, None, None), x @ m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin(x[:3], None, torch.empty(3, 11)), x[:3] @ m, rtol=1e-5, atol=1e-5)  # other rows
    code, weight, w_lin = lin.cpp_args()
    assert code == {"blas": 0, "mkl_packed": 1}.get(impl, 2) and (weight is None) == (impl == "blas")


def test_an_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="no matrix product named 'cublas'"):
        Linear("cublas", torch.zeros(2, 2), 1)
    with pytest.raises(ValueError, match="no matrix product named 'fast' for input"):
        CpuProducts(input="fast")


@pytest.mark.parametrize("order", products.ORDERS)
def test_both_operand_orders_of_a_weight_gradient_compute_a_transposed_b(order):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(9, 4, generator=g), torch.randn(9, 6, generator=g)
    torch.testing.assert_close(products.transposed_product(order, a, b), a.t() @ b, rtol=1e-5, atol=1e-5)
    times = products.measure_orders(Shape(9, 4, 6, 1, True, False, False))
    assert set(times) == set(products.ORDERS) and all(t > 0 for t in times.values())


def test_a_packing_is_spread_over_its_uses_and_not_scaled_with_the_rows():
    """A per-window product measured at 512 of its 4,096 rows: the call's time is scaled by 8, the
    packing of M (the same work at any rows) is paid once; at a step site it is spread over bptt calls."""
    window = Shape(4096, 1024, 4096, 1, True, False, False)
    assert products.site_seconds(0.010, 0.004, window, 512) == pytest.approx(0.080 + 0.004)
    step = Shape(32, 1024, 4096, 128, True, True, True)
    assert products.site_seconds(0.003, 0.128, step, 32) == pytest.approx(0.003 + 0.001)
    times = products.measure(Shape(1024, 16, 8, 1, True, False, False), impls=("blas",), rounds=1)
    assert set(times) == {"blas"} and times["blas"] > 0


def test_measured_once_per_machine_then_read_from_the_cache(cache, monkeypatch):
    shape = Shape(4, 8, 32, 6, True, True, True)
    first = products.cached_times("step_fwd", shape, 2)
    assert set(first) == {impl for impl in products.IMPLS if products.usable(impl)}
    assert all(t > 0 for t in first.values())
    saved = json.loads(cache.read_text())
    (key,) = saved
    assert products.machine() in key and torch.__version__ in key
    monkeypatch.setattr(products, "measure", lambda *a, **k: pytest.fail("measured again"))
    assert products.cached_times("step_fwd", shape, 2) == first
    with pytest.raises(pytest.fail.Exception):  # another thread count is another entry
        products.cached_times("step_fwd", shape, 1)


def test_ranks_agree_on_the_candidate_whose_slowest_rank_is_fastest(cache, monkeypatch):
    """Two ranks (the second on another CPU, where oneDNN is slow): each site takes the implementation
    that is best for the slower of the two, the same on both; a candidate one rank lacks is out."""
    mine = {"blas": 3.0, "mkl_packed": 1.0, "onednn": 2.0}
    other = {"blas": 3.5, "mkl_packed": 4.0, "onednn": 2.5, "onednn_packed": 0.1}
    monkeypatch.setattr(products, "cached_times", lambda site, shape, threads: dict(mine))
    seen = []

    def gather(obj):
        seen.append(obj)
        return [obj, {site: dict(other) for site in obj}]

    monkeypatch.setattr(products, "SITE_IMPLS", {site: products.IMPLS for site in products.SITES})
    monkeypatch.setattr(CpuProducts, "__post_init__", lambda self: None)  # the same candidates at every site here
    chosen = products.choose(4, 8, 6, 8, 1, "auto", gather)
    assert chosen == CpuProducts(**{site: "onednn" for site in products.SITES})
    assert set(seen[0]) == set(products.SITES)
    alone = products.choose(4, 8, 6, 8, 1, "auto", lambda obj: [obj])
    assert alone == CpuProducts(**{site: "mkl_packed" for site in products.SITES})
    # BLAS's product stays where the best is within 3% of it: a near tie is noise
    mine.update(blas=1.02)
    assert products.choose(4, 8, 6, 8, 1, "auto", lambda obj: [obj]) == CpuProducts()


def test_a_forced_implementation_is_taken_without_measuring(cache, monkeypatch):
    monkeypatch.setattr(products, "measure", lambda *a, **k: pytest.fail("measured"))
    assert products.choose(4, 8, 6, 8, 1, "blas", lambda obj: [obj]) == CpuProducts()
    if products.usable("onednn_packed"):
        forced = products.choose(4, 8, 6, 8, 1, "onednn_packed", lambda obj: [obj])
        assert forced == CpuProducts(**{site: "onednn_packed" for site in products.SITES[:4]})  # weight grads: BLAS
        assert forced.describe() == ("products step_fwd=onednn_packed step_bwd=onednn_packed input=onednn_packed "
                                     "grad_x=onednn_packed grad_w=blas grad_u=blas")
    assert not cache.exists()


def test_a_resume_reuses_the_checkpoints_choice_where_it_was_made_and_says_so_elsewhere():
    theirs = CpuProducts(step_fwd="mkl_packed", step_bwd="onednn", input="blas", grad_x="blas")
    current = CpuProducts()
    said = []
    here = products.record(theirs)
    assert all(type(v) in (str, int) for v in here.values())  # what torch.load(weights_only=True) takes
    assert products.resumed(here, current, said.append, lambda mine: [mine]) == theirs and not said
    # another rank is elsewhere: every rank keeps what it measured, rank 0 says why the numbers differ
    assert products.resumed(here, current, said.append, lambda mine: [mine, False]) == current
    assert len(said) == 1 and "differ from an uninterrupted run's by rounding" in said[0]
    said.clear()
    elsewhere = {**here, "machine": "Some Other CPU (family 6 model 143 stepping 8, flags 0badf00d)"}
    assert products.resumed(elsewhere, current, said.append, lambda mine: [mine]) == current
    assert said == [f"note: the checkpoint's CPU matrix products ({theirs.describe()}) were chosen on "
                    f"{elsewhere['machine']} with torch {torch.__version__} and {torch.get_num_threads()} threads; "
                    f"this run measured {current.describe()} here, so its numbers differ from an uninterrupted "
                    "run's by rounding"]
    # an old checkpoint (no record) or the same choice: nothing said
    said.clear()
    assert products.resumed(None, current, said.append, lambda mine: [mine]) == current
    assert products.resumed({**elsewhere, **current.as_dict()}, current, said.append, lambda mine: [mine]) == current
    assert not said
