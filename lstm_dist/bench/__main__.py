"""Throughput of the LSTM layers against torch.nn.LSTM: forward + backward of one training window.

    python -m lstm_dist.bench                                   # CPU default shape, a table
    python -m lstm_dist.bench --batch-size 128 --bptt 64 --embedding 256 --hidden 1024
    python -m lstm_dist.bench --device cuda --precision bf16 --batch-size 256 --hidden 1024 --layers 2
    python -m lstm_dist.bench --config configs/wikitext103.yaml --device cuda   # a config's shape and precision
    python -m lstm_dist.bench --json                            # one JSON object on stdout
    python -m lstm_dist.bench --train                           # whole training step, grid of shapes
    python -m lstm_dist.bench --train --shape 2,512,128,64      # one shape: layers,hidden,embedding,batch
    python -m lstm_dist.bench --train --config configs/smoke.yaml model.hidden=512   # a config's one shape

The options for the shape, precision and kernels are the run's settings (flag -> setting: --batch-size
train.batch_size, --bptt train.bptt, --embedding/--hidden/--layers model.*, --precision train.precision,
--compile model.compile, --triton model.triton, --cuda-graphs model.cuda_graphs, --cpu-matmul
model.cpu_matmul, --tf32 train.tf32, --threads train.threads, --device train.device). `--config FILE`
and `section.key=value` overrides set them as they set a run's (other settings are read and ignored),
a flag winning over both; with neither, bench's own defaults (`DEFAULTS`: batch 64, fp32) apply.

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
from lstm_dist.bench.timing import append_jsonl, parse_paths, precision_of_dtype
from lstm_dist.bench.training import format_train_table, run_train_bench
from lstm_dist.common.distributed import pick_device
from lstm_dist.common.errors import UserError, run_cli
from lstm_dist import config as config_mod
from lstm_dist.config import choices


# Bench's own defaults, used where neither --config nor an override is given (a flag wins over them):
# the layer bench's historical shape, in fp32. The flag that sets each, and the setting it stands for.
DEFAULTS = {"batch_size": 64, "bptt": 128, "embedding": 128, "hidden": 512, "layers": 1, "precision": "fp32",
            "compile": True, "triton": False, "cuda_graphs": False, "cpu_matmul": "auto", "tf32": True,
            "threads": None, "device": "auto"}
SETTINGS = {"batch_size": "train.batch_size", "bptt": "train.bptt", "embedding": "model.embedding",
            "hidden": "model.hidden", "layers": "model.layers", "precision": "train.precision",
            "compile": "model.compile", "triton": "model.triton", "cuda_graphs": "model.cuda_graphs",
            "cpu_matmul": "model.cpu_matmul", "tf32": "train.tf32", "threads": "train.threads", "device": "train.device"}
SHAPE = ("layers", "hidden", "embedding", "batch_size")  # one --train shape, as --shape orders it
EPILOG = """\
The shape, precision and kernel options are the run's settings under the names training uses:
--config FILE and section.key=value overrides set them (model.hidden, train.batch_size, train.bptt,
train.precision, model.compile, ...), a flag wins over both; with neither, bench's defaults above apply.
With --train and a config (or --layers/--hidden/--embedding/--batch-size), its one shape is timed instead
of the built-in grid. Old names still accepted: --batch (--batch-size), --dtype float32|bfloat16
(--precision fp32|bf16), --graphs (--cuda-graphs), --vocab (--vocab-size).

FLOPs per window = 3 * sum_k 2*4H*(E_k+H) * batch * bptt (forward 1x, backward 2x; E_0 = embedding,
E_k = hidden). MFU = FLOPs / time / peak, shown on CUDA."""
def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    """The command line, settled: every setting from the flags, else the config (`--config` and overrides,
    when given), else `DEFAULTS`; the attribute names the benches read (`batch`, `dtype` float32|bfloat16,
    `no_compile`, `graphs`, `no_tf32`, `vocab`, `shape` a list of (layers, hidden, embedding, batch) or None
    for the grid). Errors: one-line UserErrors."""
    p = argparse.ArgumentParser(prog="python -m lstm_dist.bench", epilog=EPILOG,
                                description="Forward+backward time of one window: lstm_dist fast / reference vs torch.nn.LSTM.")
    config_mod.add_arguments(p, print_config=False)
    hidden = argparse.SUPPRESS
    p.add_argument("--batch-size", type=int, metavar="N", help="streams per window, as train.batch_size (default 64)")
    p.add_argument("--batch", type=int, dest="batch_size", default=hidden, help=hidden)  # old name
    p.add_argument("--bptt", type=int, metavar="N", help="time steps per window, as train.bptt (default 128)")
    p.add_argument("--embedding", type=int, metavar="N", help="input width of the first layer, as model.embedding (default 128)")
    p.add_argument("--hidden", type=int, metavar="N", help="hidden units per layer, as model.hidden (default 512)")
    p.add_argument("--layers", type=int, metavar="N", help="stacked layers, as model.layers (default 1)")
    p.add_argument("--device", choices=choices("train.device"), help="as train.device: auto (default): cuda if available, else cpu")
    p.add_argument("--precision", choices=choices("train.precision"),
                   help="as train.precision: fp32 (default), bf16 = torch.autocast on the device (state and cell "
                        "update stay fp32), auto = bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--dtype", dest="precision", type=precision_of_dtype, default=hidden, help=hidden)  # old name: float32 | bfloat16
    p.add_argument("--repeats", type=int, default=5, metavar="N", help="timed windows per implementation (default 5)")
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed windows per implementation first (default 2)")
    p.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads, as train.threads (default: torch's choice)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="as model.compile: the fast implementation's pointwise steps compiled on CUDA (default on)")
    p.add_argument("--triton", action=argparse.BooleanOptionalAction,
                   help="as model.triton: on CUDA, each time step as one Triton kernel per direction; each row's path says what ran")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                   help="as model.cuda_graphs: on CUDA, each layer's time loops recorded as CUDA graphs and replayed, "
                        "with whichever steps run; at least 3 untimed windows so that no timed one captures")
    p.add_argument("--graphs", action="store_true", dest="cuda_graphs", default=hidden, help=hidden)  # old name
    p.add_argument("--cpu-matmul", choices=choices("model.cpu_matmul"),
                   help="as model.cpu_matmul: on the CPU, the fast path's matrix products: auto (default) measures each "
                        "one's candidates on this machine; or force blas, mkl_packed, onednn or onednn_packed (A/B figures)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction,
                   help="as train.tf32: on CUDA, fp32 products in TF32 for both models (default on, as cuDNN); "
                        "--no-tf32 for full FP32")
    p.add_argument("--peak-tflops", type=float, default=990.0, metavar="T", help="peak for MFU (default 990 = H200 dense bf16)")
    p.add_argument("--skip-reference", action="store_true", help="do not time the (slow) reference")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--jsonl", metavar="FILE", default=None,
                   help="also append each result to FILE as one JSON line the moment it is measured (with --train, "
                        "a line per shape), so that a bench stopped by a time limit keeps what it measured")
    p.add_argument("--train", action="store_true",
                   help="time a whole training step of CharLSTM vs the same model on torch.nn.LSTM over a grid of "
                        "shapes (or the config's one shape)")
    p.add_argument("--shape", action="append", metavar="L,H,E,B",
                   help="with --train: layers,hidden,embedding,batch (repeatable; default: the built-in grid)")
    p.add_argument("--vocab-size", type=int, default=256, metavar="N",
                   help="with --train: vocabulary size (default 256, the bytes vocabulary)")
    p.add_argument("--vocab", type=int, dest="vocab_size", default=hidden, help=hidden)  # old name
    p.add_argument("--paths", default=None, metavar="P,P,...",
                   help="with --train: time each of these paths against one nn.LSTM per shape, interleaved in this "
                        "process: eager, compiled, triton, each optionally +graphs (e.g. compiled,compiled+graphs,"
                        "triton+graphs); instead of --no-compile, --triton, --cuda-graphs")
    args = config_mod.parse_args(p, argv)
    flags = {name: getattr(args, name) for name in DEFAULTS if getattr(args, name) is not None}
    from_config = args.config is not None or bool(args.overrides)
    if from_config:
        cfg = config_mod.load(args.config, args.overrides)
        base = {name: config_mod.value_at(cfg, key) for name, key in SETTINGS.items()}
        base["threads"] = base["threads"] or None  # 0: torch's choice in this one process
    else:
        base = dict(DEFAULTS)
    for name, value in {**base, **flags}.items():
        setattr(args, name, value)

    if args.paths is not None:
        if not args.train:
            raise UserError("--paths goes with --train; the layer bench takes --no-compile, --triton, --cuda-graphs")
        if any(name in flags for name in ("compile", "triton", "cuda_graphs")):
            raise UserError("--paths names every path to time; leave out --compile/--no-compile, --triton and "
                            "--cuda-graphs with it")
        args.paths = parse_paths(args.paths)
    if args.shape is not None and not args.train:
        raise UserError("--shape goes with --train; for the layer bench use --layers/--hidden/--embedding/--batch-size")
    if args.shape is not None:
        both = [f"--{name.replace('_', '-')}" for name in SHAPE if name in flags]
        if both:
            raise UserError(f"--shape names whole shapes (layers,hidden,embedding,batch); leave out {', '.join(both)} with it")
        args.shape = [_shape(text) for text in args.shape]
    elif args.train and (from_config or any(name in flags for name in SHAPE)):
        args.shape = [tuple(getattr(args, name) for name in SHAPE)]  # the config's (or the flags') one shape
    if args.vocab_size < 2:
        raise UserError(f"--vocab-size must be >= 2, got {args.vocab_size}")
    for name in ("batch_size", "bptt", "embedding", "hidden", "layers", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.peak_tflops <= 0:
        raise UserError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    # The names the benches (layers.py, training.py) read.
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda)
    args.batch, args.dtype, args.vocab = args.batch_size, "bfloat16" if bf16 else "float32", args.vocab_size
    args.no_compile, args.graphs, args.no_tf32 = not args.compile, args.cuda_graphs, not args.tf32
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
