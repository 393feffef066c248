"""`python -m lstm_dist.bench --train`: a whole training step of CharLSTM against the same model on
torch.nn.LSTM, over the grid of shapes users train.

What is timed, per shape, for both models in one process: one optimizer step of truncated BPTT,
the trainer's own (`lstm_dist.training.step.TrainingStep`, without the loop's data loading and
bookkeeping): embedding, the LSTM layers, the head, the cross-entropy over the window, backward,
global gradient clipping, AdamW (the default settings, `lstm_dist.training.optim.build_optimizer`)
and zeroing the gradients, with the (h, c) state carried from window to window and detached. Ours
runs the kernels a training run of that shape would choose (`lstm_dist.model.kernels.choose_kernels`;
each row names them, `--no-compile` leaves out the compiled CUDA steps). The baseline is the
same module with one `torch.nn.LSTM(embedding, hidden, layers)` in place of our layers (time-major,
as ours runs inside; the same weights), i.e. oneDNN's fused LSTM on the CPU and cuDNN's on CUDA. After
--warmup untimed steps of each (ours compiles its pointwise step there), the two are timed in
turn, interleaved, --repeats times; the table shows medians.

Under --dtype bfloat16 both run inside the trainer's autocast (`Kernels.autocast`: bf16 on CUDA): our
matrix products run in bf16 with the state and cell update in fp32; cuDNN's LSTM under autocast
runs in fp16 (autocast's cast policy for `lstm`), which the table labels.
"""

from __future__ import annotations

import statistics
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from lstm_dist.bench.timing import (append_jsonl, baseline_dtype, failures, path_ran, path_settings, timed,
                                   warmup_windows)
from lstm_dist.config import ModelConfig, TrainConfig
from lstm_dist.model import graphs
from lstm_dist.model.char_lstm import CharLSTM, State
from lstm_dist.model.kernels import Kernels, choose_kernels
from lstm_dist.model.products import CpuProducts
from lstm_dist.training.optim import build_optimizer
from lstm_dist.training.step import TrainingStep

# (layers, hidden, embedding, batch): the shapes of the issue that asked for this, smoke model first
GRID: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 256, 64, 64),
    (2, 256, 64, 32),
    (1, 512, 128, 64),
    (2, 512, 128, 64),
    (1, 1024, 256, 128),
    (2, 1024, 256, 32),
)


class TorchLSTMModel(nn.Module):
    """CharLSTM's embedding and head around one torch.nn.LSTM, with CharLSTM's weights copied in."""

    def __init__(self, ours: CharLSTM) -> None:
        super().__init__()
        self.embed = nn.Embedding(ours.vocab_size, ours.embedding_size)
        self.lstm = nn.LSTM(ours.embedding_size, ours.hidden_size, ours.num_layers)
        self.head = nn.Linear(ours.hidden_size, ours.vocab_size)
        with torch.no_grad():
            self.embed.weight.copy_(ours.embed.weight)
            self.head.weight.copy_(ours.head.weight)
            self.head.bias.copy_(ours.head.bias)
            for k, cell in enumerate(ours.cells):
                getattr(self.lstm, f"weight_ih_l{k}").copy_(cell.weight_ih)
                getattr(self.lstm, f"weight_hh_l{k}").copy_(cell.weight_hh)
                getattr(self.lstm, f"bias_ih_l{k}").copy_(cell.bias)
                getattr(self.lstm, f"bias_hh_l{k}").zero_()

    def forward(self, x: torch.Tensor, state: Optional[State] = None):
        y, state = self.lstm(self.embed(x.t()), state)
        return self.head(y).transpose(0, 1), state


def _stepper(model: nn.Module, vocab: int, batch: int, bptt: int, device: torch.device,
             kernels: Kernels, seed: int) -> Callable[[], None]:
    """One training step of `model` per call (`TrainingStep`, under `kernels`' autocast, the default
    settings' clipping and rate), on fresh random windows, the state carried over."""
    t = TrainConfig()
    step = TrainingStep(model, model, build_optimizer(model, t), t.clip_norm, kernels.autocast)
    gen = torch.Generator().manual_seed(seed)
    state: List[Optional[State]] = [None]

    def run() -> None:
        tokens = torch.randint(0, vocab, (batch, bptt + 1), generator=gen).to(device)
        _, state[0] = step(tokens[:, :-1], tokens[:, 1:], state[0], t.lr)

    return run


def bench_shape(layers: int, hidden: int, embedding: int, batch: int, *, bptt: int, vocab: int,
                device: torch.device, bf16: bool, repeats: int, warmup: int, paths: Dict[str, dict],
                tf32: bool = True, cpu_matmul: str = "auto") -> List[dict]:
    """Median step time at one shape of our model on each of `paths` (a label -> its `ModelConfig` kernel
    settings, `timing.path_settings`) and of torch.nn.LSTM, all timed in turn, interleaved, in this
    process: one row per path, each with the same nn.LSTM times. With CUDA graphs, at least enough
    untimed steps for every layer to capture (`warmup_windows`); the shape's sets are dropped after it."""
    steps: Dict[str, Callable[[], None]] = {}
    chosen: Dict[str, tuple] = {}
    torch.manual_seed(0)
    first_model = None
    for label, settings in paths.items():
        model_cfg = ModelConfig(embedding=embedding, hidden=hidden, layers=layers, cpu_matmul=cpu_matmul, **settings)
        # The kernels a training run of this shape would choose (a fallback warning goes to stderr). `auto`:
        # bf16 autocast on CUDA, fp32 on the CPU, as --dtype bfloat16 has always meant here, without the
        # note that train.precision=bf16 gives on a CPU.
        kernels = choose_kernels(model_cfg, "auto" if bf16 else "fp32", device, batch=batch,
                                 say=lambda line: print(line, file=sys.stderr, flush=True), tf32=tf32, bptt=bptt,
                                 vocab=vocab)
        chosen[label] = (kernels, failures())
        model = CharLSTM.from_config(model_cfg, vocab, kernels=kernels).to(device)
        if first_model is None:
            first_model = model
        else:  # every path from the same weights
            model.load_state_dict(first_model.state_dict())
        steps[label] = _stepper(model, vocab, batch, bptt, device, kernels, seed=1)
    any_kernels = next(iter(chosen.values()))[0]
    steps["torch_lstm"] = _stepper(TorchLSTMModel(first_model).to(device), vocab, batch, bptt, device, any_kernels,
                                   seed=1)
    first: Dict[str, float] = {}
    for name, fn in steps.items():
        first[name] = timed(fn, device)
        untimed = warmup_windows(warmup, chosen[name][0]) if name in chosen else warmup
        for _ in range(untimed - 1):
            timed(fn, device)
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            times[name].append(timed(fn, device))
    ms = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    rows = []
    for label, (kernels, before) in chosen.items():
        row = {"layers": layers, "hidden": hidden, "embedding": embedding, "batch": batch, "bptt": bptt,
               "asked": label, "kernels": kernels.describe(), "compiled": kernels.runs_compiled(),
               "graphs": kernels.runs_graphs(), "tf32": kernels.tf32, "path": path_ran(kernels, before),
               "products": kernels.products.as_dict()}
        for name, key in ((label, "lstm_dist"), ("torch_lstm", "torch_lstm")):
            row[f"{key}_ms"] = ms[name]
            row[f"{key}_min_ms"] = min(times[name]) * 1e3
            row[f"{key}_chars_per_s"] = batch * bptt / (ms[name] / 1e3)
            row[f"{key}_first_step_s"] = first[name]
        row["ratio"] = row["lstm_dist_ms"] / row["torch_lstm_ms"]
        rows.append(row)
    graphs.clear()  # this shape's static buffers and graphs go with its models
    return rows


def train_paths(args) -> Dict[str, dict]:
    """The paths a --train bench times: --paths (each named as `timing.path_settings` takes it), else the
    one --no-compile, --triton and --graphs describe (labelled "as asked")."""
    if args.paths:
        return {name: path_settings(name) for name in args.paths}
    return {"as asked": {"compile": not args.no_compile, "triton": args.triton, "cuda_graphs": args.graphs}}


def run_train_bench(args, device: torch.device) -> dict:
    shapes = GRID if args.shape is None else tuple(args.shape)
    bf16 = args.dtype == "bfloat16"
    paths = train_paths(args)
    rows = []
    for shape in shapes:
        for row in bench_shape(*shape, bptt=args.bptt, vocab=args.vocab, device=device, bf16=bf16, repeats=args.repeats,
                               warmup=args.warmup, paths=paths, tf32=not args.no_tf32, cpu_matmul=args.cpu_matmul):
            rows.append(row)
            if args.jsonl:
                append_jsonl(args.jsonl, {"mode": "train", "device": str(device), "dtype": args.dtype, **row})
    return {
        "mode": "train",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "baseline_computes_in": baseline_dtype(args.dtype, device, not args.no_tf32),
        "threads": torch.get_num_threads(),
        "vocab": args.vocab,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "compile": any(row.pop("compiled") for row in rows),
        "torch_version": torch.__version__,
        "rows": rows,
        "worst_ratio": max(r["ratio"] for r in rows),
    }


def format_train_table(r: dict) -> str:
    lines = [
        f"lstm_dist.bench --train  device={r['device_name']}  dtype={r['dtype']} (torch.nn.LSTM computes in "
        f"{r['baseline_computes_in']})  threads={r['threads']}  vocab={r['vocab']}  compile={r['compile']}  "
        f"median of {r['repeats']}, interleaved",
        f"{'layers':>6}{'hidden':>7}{'emb':>5}{'batch':>6}{'bptt':>5}"
        f"{'lstm_dist ms':>14}{'nn.LSTM ms':>12}{'ratio':>7}{'lstm_dist chars/s':>19}{'nn.LSTM chars/s':>17}  path",
    ]
    for row in r["rows"]:
        lines.append(
            f"{row['layers']:>6}{row['hidden']:>7}{row['embedding']:>5}{row['batch']:>6}{row['bptt']:>5}"
            f"{row['lstm_dist_ms']:>14.1f}{row['torch_lstm_ms']:>12.1f}{row['ratio']:>7.3f}"
            f"{row['lstm_dist_chars_per_s']:>19,.0f}{row['torch_lstm_chars_per_s']:>17,.0f}  "
            + (row["path"] if row["asked"] == "as asked" else f"{row['asked']}: {row['path']}")
            + (f", {CpuProducts(**row['products']).describe()}" if r["device"] == "cpu" else "")
        )
    lines.append(f"worst ratio {r['worst_ratio']:.3f} (lstm_dist step time / torch.nn.LSTM step time; below 1 is faster)")
    return "\n".join(lines)
