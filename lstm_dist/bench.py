"""Throughput of the LSTM layers against torch.nn.LSTM: forward + backward of one training window.

    python -m lstm_dist.bench                                   # CPU default shape, a table
    python -m lstm_dist.bench --batch 128 --bptt 64 --embedding 256 --hidden 1024
    python -m lstm_dist.bench --device cuda --dtype bfloat16 --batch 256 --hidden 1024 --layers 2
    python -m lstm_dist.bench --json                            # one JSON object on stdout
    python -m lstm_dist.bench --train                           # whole training step, grid of shapes
    python -m lstm_dist.bench --train --shape 2,512,128,64      # one shape: layers,hidden,embedding,batch

`--train` times a whole optimizer step (embedding, layers, head, loss, backward, clipping, AdamW) of
CharLSTM against the same model on torch.nn.LSTM over a grid of shapes: `lstm_dist.bench_train`.
Without it:

What is timed, for each of `fast`, `reference` (lstm_dist.model) and `torch.nn.LSTM`, all with the
same shapes and the same process: the LSTM layers only (no embedding, no head) over one window of
input features x [bptt, batch, embedding] (requires grad, as an embedding output does) with a
carried non-zero state, loss = sum of the outputs, then backward to the input, the initial state and
every weight. After --warmup untimed windows of each (the first `fast` one includes compiling the
pointwise step unless --no-compile; its time is reported as warm-up), the three are timed in turn,
interleaved, --repeats times, and the medians are reported.

FLOPs counted per window (the matrix products only): forward 2·4H·(E_k + H) per character per layer
(E_0 = embedding, E_k = hidden above), backward twice that (the input and the weight gradients), so
3 · Σ_k 2·4H·(E_k+H) · batch · bptt. MFU = those FLOPs / time / peak; shown on CUDA only, with the
peak from --peak-tflops (default 990, dense bf16 on an H200).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from lstm_dist.distributed import DEVICES, pick_device
from lstm_dist.errors import UserError, run_cli
from lstm_dist.lstm import compile_available, compile_steps
from lstm_dist.model import LSTMLayer

IMPL_NAMES = ("fast", "reference", "torch_lstm")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lstm_dist.bench",
        description="Forward+backward time of one window: lstm_dist fast / reference vs torch.nn.LSTM.",
        epilog="FLOPs per window = 3 * sum_k 2*4H*(E_k+H) * batch * bptt (forward 1x, backward 2x; "
        "E_0 = embedding, E_k = hidden). MFU = FLOPs / time / peak, shown on CUDA.",
    )
    p.add_argument("--batch", type=int, default=64, help="streams per window (default 64)")
    p.add_argument("--bptt", type=int, default=128, help="time steps per window (default 128)")
    p.add_argument("--embedding", type=int, default=128, help="input width of the first layer (default 128)")
    p.add_argument("--hidden", type=int, default=512, help="hidden units per layer (default 512)")
    p.add_argument("--layers", type=int, default=1, help="stacked layers (default 1)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto (default): cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16 = torch.autocast on the device (state and cell update stay fp32)")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per implementation (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed windows per implementation first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-compile", action="store_true", help="fast implementation without torch.compile")
    p.add_argument("--peak-tflops", type=float, default=990.0, help="peak for MFU (default 990 = H200 dense bf16)")
    p.add_argument("--skip-reference", action="store_true", help="do not time the (slow) reference")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--train", action="store_true",
                   help="time a whole training step of CharLSTM vs the same model on torch.nn.LSTM over a grid of shapes")
    p.add_argument("--shape", action="append", metavar="L,H,E,B",
                   help="with --train: layers,hidden,embedding,batch (repeatable; default: the built-in grid)")
    p.add_argument("--vocab", type=int, default=256, help="with --train: vocabulary size (default 256, the bytes vocabulary)")
    args = p.parse_args(argv)
    if args.shape is not None and not args.train:
        raise UserError("--shape goes with --train; for the layer bench use --layers/--hidden/--embedding/--batch")
    if args.shape is not None:
        args.shape = [_shape(text) for text in args.shape]
    if args.vocab < 2:
        raise UserError(f"--vocab must be >= 2, got {args.vocab}")
    for name in ("batch", "bptt", "embedding", "hidden", "layers", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.peak_tflops <= 0:
        raise UserError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    return args


def _shape(text: str) -> tuple:
    try:
        layers, hidden, embedding, batch = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--shape expects layers,hidden,embedding,batch, got {text!r}; try --shape 2,512,128,64") from None
    if min(layers, hidden, embedding, batch) < 1:
        raise UserError(f"--shape numbers must be >= 1, got {text!r}; try --shape 2,512,128,64")
    return layers, hidden, embedding, batch


def window_flops(batch: int, bptt: int, embedding: int, hidden: int, layers: int) -> float:
    """Matrix-product FLOPs of forward + backward over one window (see the module docstring)."""
    per_char = sum(2 * 4 * hidden * ((embedding if k == 0 else hidden) + hidden) for k in range(layers))
    return 3.0 * per_char * batch * bptt


def _make_runners(args: argparse.Namespace, device: torch.device) -> Dict[str, Callable[[], None]]:
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
    use_compile = not args.no_compile

    def ours_window(impl: str) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                inp = x
                for k, layer in enumerate(ours):
                    inp, _, _ = layer(inp, h0[k], c0[k], impl, use_compile)
                loss = inp.float().sum()
            loss.backward()

        return run

    def torch_window() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            y, _ = theirs(x, (h0, c0))
            loss = y.float().sum()
        loss.backward()

    runners = {"fast": ours_window("fast"), "reference": ours_window("reference"), "torch_lstm": torch_window}
    if args.skip_reference:
        del runners["reference"]
    return runners


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_bench(args: argparse.Namespace) -> dict:
    device = pick_device(args.device, setting="--device ")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    runners = _make_runners(args, device)
    warmup_s: Dict[str, float] = {}
    for name, fn in runners.items():
        first = _timed(fn, device)  # the first fast window compiles the pointwise step
        for _ in range(args.warmup - 1):
            _timed(fn, device)
        warmup_s[name] = first
    times: Dict[str, List[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            times[name].append(_timed(fn, device))
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
        "compile": any(compile_steps(not args.no_compile, device.type)) and compile_available(),
        "baseline_computes_in": baseline_dtype(args.dtype, device),
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


def baseline_dtype(dtype: str, device: torch.device) -> str:
    """What torch.nn.LSTM computes in under our --dtype: autocast's cast policy sends `lstm` to fp16
    on CUDA (cuDNN), so a bf16 comparison there is ours in bf16 against cuDNN in fp16."""
    if dtype == "bfloat16" and device.type == "cuda":
        return "float16 (cuDNN under autocast)"
    return dtype


def format_table(r: dict) -> str:
    cuda = r["device"].startswith("cuda")
    lines = [
        f"lstm_dist.bench  device={r['device_name']}  dtype={r['dtype']}  threads={r['threads']}  "
        f"batch={r['batch']} bptt={r['bptt']} embedding={r['embedding']} hidden={r['hidden']} "
        f"layers={r['layers']}  compile={r['compile']}  median of {r['repeats']}  "
        f"(torch.nn.LSTM computes in {r['baseline_computes_in']})",
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


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.train:
        from lstm_dist.bench_train import format_train_table, run_train_bench

        device = pick_device(args.device, setting="--device ")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        result = run_train_bench(args, device)
        print(json.dumps(result) if args.json else format_train_table(result))
        return 0
    result = run_bench(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    run_cli(main)
