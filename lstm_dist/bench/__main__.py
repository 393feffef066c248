"""Throughput of the LSTM layers against torch.nn.LSTM: forward + backward of one training window.

    python -m lstm_dist.bench                                   # CPU default shape, a table
    python -m lstm_dist.bench --batch 128 --bptt 64 --embedding 256 --hidden 1024
    python -m lstm_dist.bench --device cuda --dtype bfloat16 --batch 256 --hidden 1024 --layers 2
    python -m lstm_dist.bench --json                            # one JSON object on stdout
    python -m lstm_dist.bench --train                           # whole training step, grid of shapes
    python -m lstm_dist.bench --train --shape 2,512,128,64      # one shape: layers,hidden,embedding,batch

`--train` times a whole optimizer step (embedding, layers, head, loss, backward, clipping, AdamW) of
CharLSTM against the same model on torch.nn.LSTM over a grid of shapes: `lstm_dist.bench.training`.
Without it:

What is timed, for each of `fast`, `reference` (lstm_dist.model) and `torch.nn.LSTM`, all with the
same shapes and the same process: the LSTM layers only (no embedding, no head) over one window of
input features x [bptt, batch, embedding] (requires grad, as an embedding output does) with a
carried non-zero state, loss = sum of the outputs, then backward to the input, the initial state and
every weight. `fast` runs the kernels a training run would on this device
(`lstm_dist.model.kernels.choose_kernels` with model.impl=fast, model.compile unless --no-compile:
the compiled steps on CUDA, the C++ loops on the CPU where they build); the JSON says which
(`kernels`, and `compile`: whether the pointwise steps ran compiled). After --warmup untimed windows
of each (the first `fast` one includes compiling the pointwise step on CUDA unless --no-compile; its
time is reported as warm-up), the three are timed in turn, interleaved, --repeats times, and the
medians are reported.

FLOPs counted per window (the matrix products only): forward 2·4H·(E_k + H) per character per layer
(E_0 = embedding, E_k = hidden above), backward twice that (the input and the weight gradients), so
3 · Σ_k 2·4H·(E_k+H) · batch · bptt. MFU = those FLOPs / time / peak; shown on CUDA only, with the
peak from --peak-tflops (default 990, dense bf16 on an H200).
"""

from __future__ import annotations

import argparse
import json
from typing import List, Optional

import torch

from lstm_dist.bench.layers import format_table, run_bench
from lstm_dist.bench.timing import append_jsonl, parse_paths
from lstm_dist.bench.training import format_train_table, run_train_bench
from lstm_dist.common.distributed import pick_device
from lstm_dist.common.errors import UserError, run_cli
from lstm_dist.config import choices


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
    p.add_argument("--device", choices=choices("train.device"), default="auto", help="auto (default): cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16 = torch.autocast on the device (state and cell update stay fp32)")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per implementation (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed windows per implementation first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-compile", action="store_true", help="fast implementation without torch.compile")
    p.add_argument("--triton", action="store_true",
                   help="on CUDA, each time step as one Triton kernel per direction (model.triton); each row's path says what ran")
    p.add_argument("--graphs", action="store_true",
                   help="on CUDA, each layer's time loops recorded as CUDA graphs and replayed (model.cuda_graphs), "
                        "with whichever steps run; at least 3 untimed windows so that no timed one captures")
    p.add_argument("--cpu-matmul", choices=choices("model.cpu_matmul"), default="auto",
                   help="on the CPU, the fast path's matrix products (model.cpu_matmul): auto (default) measures each "
                        "one's candidates on this machine; or force blas, mkl_packed, onednn or onednn_packed (A/B figures)")
    p.add_argument("--no-tf32", action="store_true",
                   help="on CUDA, fp32 products at full FP32 for both models (default: TF32, as train.tf32 and cuDNN)")
    p.add_argument("--peak-tflops", type=float, default=990.0, help="peak for MFU (default 990 = H200 dense bf16)")
    p.add_argument("--skip-reference", action="store_true", help="do not time the (slow) reference")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--jsonl", metavar="FILE", default=None,
                   help="also append each result to FILE as one JSON line the moment it is measured (with --train, "
                        "a line per shape), so that a bench stopped by a time limit keeps what it measured")
    p.add_argument("--train", action="store_true",
                   help="time a whole training step of CharLSTM vs the same model on torch.nn.LSTM over a grid of shapes")
    p.add_argument("--shape", action="append", metavar="L,H,E,B",
                   help="with --train: layers,hidden,embedding,batch (repeatable; default: the built-in grid)")
    p.add_argument("--vocab", type=int, default=256, help="with --train: vocabulary size (default 256, the bytes vocabulary)")
    p.add_argument("--paths", default=None, metavar="P,P,...",
                   help="with --train: time each of these paths against one nn.LSTM per shape, interleaved in this "
                        "process: eager, compiled, triton, each optionally +graphs (e.g. compiled,compiled+graphs,"
                        "triton+graphs); instead of --no-compile, --triton, --graphs")
    args = p.parse_args(argv)
    if args.paths is not None:
        if not args.train:
            raise UserError("--paths goes with --train; the layer bench takes --no-compile, --triton, --graphs")
        if args.no_compile or args.triton or args.graphs:
            raise UserError("--paths names every path to time; leave out --no-compile, --triton and --graphs with it")
        args.paths = parse_paths(args.paths)
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


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.train:
        device = pick_device(args.device, setting="--device ")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        result = run_train_bench(args, device)
        print(json.dumps(result) if args.json else format_train_table(result))
        return 0
    result = run_bench(args)
    if args.jsonl:
        append_jsonl(args.jsonl, {"mode": "layers", **result})
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    run_cli(main)
