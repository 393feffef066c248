"""Two GPU figures that docs/gpu.md predicts and the other benches cannot give: the device's own
ceiling for our recurrence, and what one training window costs in kernels and idle time. On the CPU
(`--device cpu`, what gpu_check's dry run does) the same entries run and count CPU ops instead.

    python -m lstm_dist.bench.profile product --hidden 2048 --batch 128 --bptt 256 --dtype bfloat16
    python -m lstm_dist.bench.profile window --shape 2,2048,256,128 --bptt 256 --dtype bfloat16

`product`: the recurrent products alone, as the layer runs them (`loops.recurrent_product`, the
forward's h U^T then the backward's dgates U, `bptt` of each, one after the other into the same
buffers), with nothing between them: no pointwise step, no launch of ours but the product's. Its time
per window and layer is the floor for the layer's time loop on this device, whatever the pointwise
steps cost (`bench --layers` minus the window's big products, against this, says how far off we are).

`window`: one training step of CharLSTM at the shape (`TrainingStep`, as `train` runs it, verdict and
optimizer included), after 3 untimed ones, under `torch.profiler`: the number of device kernels the
step launched (per layer and time step, too), the share of the step's span the device was busy
(the union of the kernels' intervals over the span from the first kernel's start to the last one's
end), and the kernels that took the most time. On the CPU (the dry run) the same counts are of the
CPU ops the profiler saw, and the row says so.

Each prints a few readable lines (`--json`: one JSON object instead), and with --jsonl FILE also
appends the JSON object there as one line.
Raises UserError for a shape that is not four positive integers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import List, Optional

import torch

from lstm_dist.bench.timing import (append_jsonl, failures, parse_paths, path_ran, path_settings, precision_of_dtype,
                                   timed, warmup_windows)
from lstm_dist.common.distributed import pick_device
from lstm_dist.common.errors import UserError, run_cli
from lstm_dist.config import ModelConfig, TrainConfig, choices
from lstm_dist.model import graphs, loops
from lstm_dist.model.char_lstm import CharLSTM
from lstm_dist.model.kernels import choose_kernels
from lstm_dist.training.optim import build_optimizer
from lstm_dist.training.step import TrainingStep


def product_floor(hidden: int, batch: int, bptt: int, dtype: str, device: torch.device, repeats: int) -> dict:
    """Median ms of one window's serial recurrent products for one layer (forward + backward, `bptt` of
    each) at [batch, hidden] x [hidden, 4·hidden], in the window's product dtype (bf16: the forward's
    operand already in bf16, as the compiled steps hand it over), and their TFLOP/s."""
    mm = torch.bfloat16 if dtype == "bfloat16" else None
    acc = torch.float32
    weight = torch.randn(4 * hidden, hidden, device=device) * hidden ** -0.5
    gates = torch.zeros(bptt, batch, 4 * hidden, device=device)
    hs = torch.randn(bptt, batch, hidden, device=device, dtype=mm or acc)
    dgates = torch.randn(bptt, batch, 4 * hidden, device=device, dtype=mm or acc)
    dh = torch.zeros(batch, hidden, device=device)
    fwd = loops.recurrent_product(weight, True, batch, acc, mm, "blas", cast=mm is None)  # (on CUDA: addmm)
    bwd = loops.recurrent_product(weight, False, batch, acc, mm, "blas", cast=mm is None)

    def window() -> None:
        for t in range(bptt):
            fwd(hs[t], gates[t], gates[t])
        for t in range(bptt - 1, -1, -1):
            bwd(dgates[t], dh, dh)

    timed(window, device)
    ms = statistics.median(timed(window, device) for _ in range(repeats)) * 1e3
    flops = 2 * 2 * bptt * batch * hidden * 4 * hidden
    return {"part": "product", "device": str(device), "dtype": dtype, "hidden": hidden, "batch": batch, "bptt": bptt,
            "product_ms_per_window_layer": ms, "product_tflops": flops / (ms / 1e3) / 1e12,
            "one_kernel_product": mm is None or loops.product_to_acc(device, mm, acc)}


def _busy_share(intervals: List[tuple]) -> tuple:
    """(busy µs, span µs) of (start, end) intervals: their union's length, and first start to last end."""
    if not intervals:
        return 0.0, 0.0
    intervals = sorted(intervals)
    busy, (cur_s, cur_e) = 0.0, intervals[0]
    for s, e in intervals[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return busy, max(e for _, e in intervals) - intervals[0][0]


def profile_window(layers: int, hidden: int, embedding: int, batch: int, bptt: int, dtype: str,
                   device: torch.device, vocab: int = 256, path: str = "compiled") -> dict:
    """One profiled training step at the shape (module docstring): kernels, busy share, top kernels, on
    `path` (as `bench --paths` names it: eager, compiled, triton, each optionally +graphs)."""
    from torch.profiler import ProfilerActivity, profile

    model_cfg = ModelConfig(embedding=embedding, hidden=hidden, layers=layers, **path_settings(path))
    kernels = choose_kernels(model_cfg, "auto" if dtype == "bfloat16" else "fp32", device, batch=batch,
                             say=lambda line: print(line, file=sys.stderr, flush=True), bptt=bptt, vocab=vocab)
    before = failures()
    torch.manual_seed(0)
    model = CharLSTM.from_config(model_cfg, vocab, kernels=kernels).to(device)
    t = TrainConfig()
    step = TrainingStep(model, model, build_optimizer(model, t), t.clip_norm, kernels.autocast)
    tokens = torch.randint(0, vocab, (batch, bptt + 1)).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    state = None
    for _ in range(max(3, warmup_windows(3, kernels))):  # compiles, pools buffers, fills the optimizer's state, captures
        _, state = step(x, y, state, t.lr)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        _, state = step(x, y, state, t.lr)
        host_ms = (time.perf_counter() - t0) * 1e3  # the host's time to queue the step (profiled)
        if cuda:
            torch.cuda.synchronize(device)
    events = [e for e in prof.events() if (e.device_type == torch.autograd.DeviceType.CUDA) == cuda]
    if not cuda:  # top-level CPU ops only: an op's children are counted inside it
        events = [e for e in events if e.cpu_parent is None]
    spans = [(e.time_range.start, e.time_range.end) for e in events]
    busy, span = _busy_share(spans)
    totals: dict = {}
    for e in events:
        count, total = totals.get(e.name, (0, 0.0))
        totals[e.name] = (count + 1, total + (e.time_range.end - e.time_range.start))
    top = sorted(totals.items(), key=lambda kv: -kv[1][1])[:8]
    return {"part": "window", "device": str(device), "dtype": dtype, "layers": layers, "hidden": hidden,
            "embedding": embedding, "batch": batch, "bptt": bptt, "asked": path, "path": path_ran(kernels, before),
            "counted": "CUDA kernels" if cuda else "CPU ops (a CPU run: no GPU kernels)",
            "kernels_per_window": len(events), "kernels_per_layer_step": len(events) / (layers * bptt),
            "busy_ms": busy / 1e3, "span_ms": span / 1e3, "busy_share": busy / span if span else 0.0,
            "top": [{"name": name[:80], "count": c, "ms": us / 1e3} for name, (c, us) in top],
            "host_ms": host_ms}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lstm_dist.bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=("product", "window"), help="the recurrent products alone, or one profiled step")
    p.add_argument("--hidden", type=int, default=2048, help="product: hidden units (default 2048)")
    p.add_argument("--batch-size", type=int, default=128, dest="batch", metavar="N", help="product: streams, as train.batch_size (default 128)")
    p.add_argument("--batch", type=int, dest="batch", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old name
    p.add_argument("--shape", default="2,2048,256,128", metavar="L,H,E,B",
                   help="window: layers,hidden,embedding,batch (default: the cluster config's 2,2048,256,128)")
    p.add_argument("--bptt", type=int, default=256, help="time steps per window (default 256)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16",
                   help="as train.precision: bf16 (default, autocast as the cluster config) or fp32")
    p.add_argument("--dtype", dest="precision", type=precision_of_dtype, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # old name: float32 | bfloat16
    p.add_argument("--device", choices=choices("train.device"), default="auto",
                   help="auto (default): cuda if available, else cpu (which counts CPU ops, not kernels)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the lines")
    p.add_argument("--repeats", type=int, default=10, help="product: timed windows (default 10)")
    p.add_argument("--jsonl", metavar="FILE", default=None, help="also append the result to FILE as one JSON line")
    p.add_argument("--paths", default="compiled", metavar="P,P,...",
                   help="window: profile one step on each of these paths, in turn (as `bench --paths`: eager, compiled, "
                        "triton, each optionally +graphs; default compiled, what the cluster config runs)")
    args = p.parse_args(argv)
    args.dtype = "bfloat16" if args.precision == "bf16" else "float32"  # the name the profiles read
    try:
        args.shape = tuple(int(v) for v in args.shape.split(","))
    except ValueError:
        args.shape = ()
    if len(args.shape) != 4 or min(args.shape) < 1:
        raise UserError("--shape expects four positive integers layers,hidden,embedding,batch; try --shape 2,2048,256,128")
    args.paths = parse_paths(args.paths)
    for name, option in (("hidden", "--hidden"), ("batch", "--batch-size"), ("bptt", "--bptt"), ("repeats", "--repeats")):
        if getattr(args, name) < 1:
            raise UserError(f"{option} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device, setting="--device ")
    if args.part == "product":
        results = [product_floor(args.hidden, args.batch, args.bptt, args.dtype, device, args.repeats)]
    else:
        results = []
        for path in args.paths:
            results.append(profile_window(*args.shape, args.bptt, args.dtype, device, path=path))
            if args.jsonl:
                append_jsonl(args.jsonl, results[-1])
            graphs.clear()  # this path's static buffers and graphs go with its model
    if args.jsonl and args.part == "product":
        append_jsonl(args.jsonl, results[0])
    # --json: one JSON object per line, a line per path
    print("\n".join(json.dumps(r) for r in results) if args.json else "\n\n".join(describe(r) for r in results))
    return 0


def describe(r: dict) -> str:
    """The result in a few lines for a person (the JSON object has every field)."""
    if r["part"] == "product":
        return (f"recurrent products alone ({r['dtype']}, {r['device']}, hidden {r['hidden']}, batch {r['batch']}, "
                f"bptt {r['bptt']}): {r['product_ms_per_window_layer']:.2f} ms per window and layer "
                f"(forward + backward), {r['product_tflops']:.2f} TFLOP/s; one kernel per product: {r['one_kernel_product']}")
    lines = [f"one profiled training step ({r['dtype']}, {r['device']}, {r['layers']} x {r['hidden']}, batch {r['batch']}, "
             f"bptt {r['bptt']}; {r['asked']}: {r['path']})",
             f"{r['kernels_per_window']} {r['counted']} per window ({r['kernels_per_layer_step']:.2f} per layer and "
             f"time step); busy {r['busy_ms']:.1f} ms of a {r['span_ms']:.1f} ms span ({100 * r['busy_share']:.1f}%); "
             f"the host queued the step in {r['host_ms']:.1f} ms (profiled)",
             "top:"]
    lines += [f"  {k['ms']:9.2f} ms  {k['count']:5d}x  {k['name']}" for k in r["top"]]
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
