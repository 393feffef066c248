"""The layer bench: forward + backward of one window of lstm_dist's layers (`fast`, `reference`)
against torch.nn.LSTM, same weights, interleaved (the command line and what is timed: `lstm_dist.bench`)."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from typing import Callable, Dict, List

import torch

from lstm_dist.bench.timing import baseline_dtype, failures, path_ran, timed, warmup_windows
from lstm_dist.common.distributed import pick_device
from lstm_dist.config import ModelConfig
from lstm_dist.model.char_lstm import LSTMLayer
from lstm_dist.model.flops import training_flops_per_token
from lstm_dist.model.kernels import Kernels, choose_kernels
from lstm_dist.model.products import CpuProducts

IMPL_NAMES = ("fast", "reference", "torch_lstm")


def window_flops(batch: int, bptt: int, embedding: int, hidden: int, layers: int) -> float:
    """Matrix-product FLOPs of forward + backward of the LSTM layers (no head: the bench times the layers
    alone) over one window of batch × bptt tokens: `model.flops.training_flops_per_token` × tokens."""
    return float(training_flops_per_token(embedding, hidden, layers) * batch * bptt)


def bench_kernels(args: argparse.Namespace, device: torch.device) -> Kernels:
    """The kernels `fast` runs: what training would choose here for model.impl=fast, with model.compile
    unless --no-compile (bf16 products under --dtype bfloat16 on CUDA; elsewhere the bench's own
    autocast does that). Lines from the choice (a fallback warning) go to stderr."""
    model_cfg = ModelConfig(embedding=args.embedding, hidden=args.hidden, layers=args.layers, impl="fast",
                            compile=not args.no_compile, triton=args.triton, cuda_graphs=args.graphs,
                            cpu_matmul=args.cpu_matmul)
    precision = "bf16" if args.dtype == "bfloat16" and device.type == "cuda" else "fp32"
    return choose_kernels(model_cfg, precision, device, batch=args.batch,
                          say=lambda line: print(line, file=sys.stderr, flush=True), tf32=not args.no_tf32,
                          bptt=args.bptt)


def _make_runners(args: argparse.Namespace, device: torch.device,
                  kernels: Kernels) -> Dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    E, H, L, B, T = args.embedding, args.hidden, args.layers, args.batch, args.bptt
    ours = [LSTMLayer(E if k == 0 else H, H).to(device) for k in range(L)]
    theirs = torch.nn.LSTM(E, H, L).to(device)
    with torch.no_grad():  # same weights everywhere (torch's two biases summed into our one)
        for k, layer in enumerate(ours):
            getattr(theirs, f"weight_ih_l{k}").copy_(layer.weight_ih)
            getattr(theirs, f"weight_hh_l{k}").copy_(layer.weight_hh)
            getattr(theirs, f"bias_ih_l{k}").copy_(layer.bias)
            getattr(theirs, f"bias_hh_l{k}").zero_()
    x = torch.randn(T, B, E, device=device, requires_grad=True)
    h0 = torch.randn(L, B, H, device=device) * 0.5
    c0 = torch.randn(L, B, H, device=device) * 0.5
    autocast = args.dtype == "bfloat16"

    def ours_window(kernels: Kernels) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                inp = x
                for k, layer in enumerate(ours):
                    inp, _, _ = layer(inp, h0[k], c0[k], kernels)
                loss = inp.float().sum()
            loss.backward()

        return run

    def torch_window() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            y, _ = theirs(x, (h0, c0))
            loss = y.float().sum()
        loss.backward()

    reference = dataclasses.replace(kernels, name="reference")
    runners = {"fast": ours_window(kernels), "reference": ours_window(reference), "torch_lstm": torch_window}
    if args.skip_reference:
        del runners["reference"]
    return runners


def run_bench(args: argparse.Namespace) -> dict:
    device = pick_device(args.device, setting="--device ")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kernels = bench_kernels(args, device)
    before = failures()
    runners = _make_runners(args, device, kernels)
    warmup_s: Dict[str, float] = {}
    for name, fn in runners.items():
        first = timed(fn, device)  # the first fast window compiles the pointwise step
        for _ in range(warmup_windows(args.warmup, kernels) - 1):
            timed(fn, device)
        warmup_s[name] = first
    times: Dict[str, List[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            times[name].append(timed(fn, device))
    chars = args.batch * args.bptt
    flops = window_flops(args.batch, args.bptt, args.embedding, args.hidden, args.layers)
    result: dict = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "bptt": args.bptt,
        "embedding": args.embedding,
        "hidden": args.hidden,
        "layers": args.layers,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "kernels": kernels.name,
        "compile": kernels.runs_compiled(),
        "path": path_ran(kernels, before),
        "products": kernels.products.as_dict(),
        "tf32": kernels.tf32,
        "baseline_computes_in": baseline_dtype(args.dtype, device, kernels.tf32),
        "flops_per_window": flops,
        "torch_version": torch.__version__,
    }
    for name in IMPL_NAMES:
        if name not in times:
            result[f"{name}_ms"] = None
            continue
        ms = statistics.median(times[name]) * 1e3
        result[f"{name}_ms"] = ms
        result[f"{name}_min_ms"] = min(times[name]) * 1e3
        result[f"{name}_chars_per_s"] = chars / (ms / 1e3)
        result[f"{name}_first_window_s"] = warmup_s[name]
        if device.type == "cuda":
            result[f"{name}_mfu"] = flops / (ms / 1e3) / (args.peak_tflops * 1e12)
    result["ratio_fast_vs_torch_lstm"] = result["fast_ms"] / result["torch_lstm_ms"]
    if result["reference_ms"] is not None:
        result["ratio_reference_vs_torch_lstm"] = result["reference_ms"] / result["torch_lstm_ms"]
    return result


def format_table(r: dict) -> str:
    cuda = r["device"].startswith("cuda")
    lines = [
        f"lstm_dist.bench  device={r['device_name']}  dtype={r['dtype']}  threads={r['threads']}  "
        f"batch={r['batch']} bptt={r['bptt']} embedding={r['embedding']} hidden={r['hidden']} "
        f"layers={r['layers']}  compile={r['compile']}  median of {r['repeats']}  "
        f"(torch.nn.LSTM computes in {r['baseline_computes_in']})  fast ran: {r['path']}"
        + ("" if cuda else f", {CpuProducts(**r['products']).describe()}"),
    ]
    header = f"{'impl':<12}{'ms/window':>12}{'min ms':>10}{'chars/s':>14}{'vs torch':>10}{'1st win s':>11}"
    if cuda:
        header += f"{'MFU':>8}"
    lines.append(header)
    for name in IMPL_NAMES:
        ms = r.get(f"{name}_ms")
        if ms is None:
            continue
        row = (
            f"{name:<12}{ms:>12.2f}{r[name + '_min_ms']:>10.2f}{r[name + '_chars_per_s']:>14,.0f}"
            f"{ms / r['torch_lstm_ms']:>10.3f}{r[name + '_first_window_s']:>11.2f}"
        )
        if cuda:
            row += f"{r[name + '_mfu'] * 100:>7.2f}%"
        lines.append(row)
    return "\n".join(lines)
