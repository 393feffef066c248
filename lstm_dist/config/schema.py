"""The settings themselves: one dataclass per section, and the range each setting must fall in.

This module is the one place where a setting's allowed values and default are written:

- its type and default are the dataclass field's (a `Literal[...]` type lists the allowed values,
  which code reads with `lstm_dist.config.choices(key)`, never a copy);
- its documentation is the `#:` comment above the field (`reference.py` makes docs/configuration.md's table of it);
- its range, where a type is not enough, is its entry in `RULES`, which `checks.py` applies on load
  and to values code takes directly (`check_setting`, `check_option`).

Below the sections: the introspection the loader and the reference walk (`leaf_fields`, `all_keys`,
`section_fields`, `is_section`, `value_at`, `set_value`). Nothing of the rest of lstm_dist is imported.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# --------------------------------------------------------------------------------------------
# The settings. A field's comment (the `#:` line above it) is its documentation: keep one each.
# --------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    #: name of the run; its directory is `run.dir/run.name`
    name: str = "smoke"
    #: parent directory of run directories
    dir: str = "runs"
    #: base random seed: model init uses `seed` on every rank, then rank r's generators (dropout) `seed + 1000·r + 1`; text samples `seed + step` (seeds.py lists them all)
    seed: int = 1234


@dataclass
class DataConfig:
    #: prepared corpus directory (train.bin, valid.bin, test.bin, vocab.json, meta.json); a missing built-in source's default location (data/stdlib-docs) is prepared on first use
    path: str = "data/stdlib-docs"
    #: vocabulary used when this run prepares the corpus itself: `bytes` (256 UTF-8 byte values) or `chars` (characters of the training split)
    vocab: Literal["bytes", "chars"] = "bytes"
    #: start each epoch after the first at a seeded random offset in [0, bptt), the same on every rank
    random_offset: bool = True


@dataclass
class ModelConfig:
    #: width of the character embedding (input size of the first LSTM layer)
    embedding: int = 128
    #: LSTM hidden units per layer
    hidden: int = 512
    #: number of stacked LSTM layers
    layers: int = 1
    #: dropout probability between LSTM layers and before the output head, in [0, 1)
    dropout: float = 0.0
    #: LSTM implementation: `fast` (hand-written backward) or `reference` (step-by-step autograd)
    impl: Literal["fast", "reference"] = "fast"
    #: on CUDA, fuse each time step's pointwise gate math into one kernel with torch.compile (the CPU runs its eager ops, measured faster there); if any rank cannot compile, every rank runs eager and the log says which
    compile: bool = True
    #: on CUDA, run each layer's time step as one Triton kernel per direction (the recurrent product with the cell update, or its gradient, fused in); opt-in until a GPU has measured it (docs/gpu.md); if any rank cannot, every rank runs the compiled steps and the log says which
    triton: bool = False
    #: on CUDA, record each layer's two time loops as CUDA graphs once and replay them every training window (one launch from the host instead of one per op and step), with whichever steps run (eager, compiled, Triton); opt-in until a GPU has measured it (docs/gpu.md); if any rank cannot capture, every rank runs without graphs and the log says which
    cuda_graphs: bool = False
    #: on the CPU, the implementation of the fast path's fp32 matrix products: `auto` measures each one's candidates on this machine at the run's shapes (cached per machine, the same on every rank, kept in checkpoints; docs/cpu_matmul.md), or one forced everywhere it applies: `blas` (torch's addmm/mm), `mkl_packed` (MKL's packed GEMM), `onednn`, `onednn_packed` (oneDNN's inner product, nn.LSTM's library on the CPU)
    cpu_matmul: Literal["auto", "blas", "mkl_packed", "onednn", "onednn_packed"] = "auto"


@dataclass
class TrainConfig:
    # The fields come in groups, each under its heading below. Their order is the order of the
    # reference table (docs/configuration.md) and of `python -m lstm_dist.config`; the names are the keys users type.

    # -- the loop: what one step reads and how many steps
    #: character streams of one forward pass on each rank (the micro-batch); without `global_batch_size` also of one optimizer step, whose global batch is then world_size × batch_size streams
    batch_size: int = 32
    #: character streams of one optimizer step across all ranks, the same whatever the number of processes (torchtitan's global batch size): every world size reads the same streams in the same order, each rank `global_batch_size / world_size` of them in micro-batches of `batch_size`, the gradients accumulated (docs/training.md); a multiple of world_size × batch_size; 0: world_size × batch_size, no accumulation
    global_batch_size: int = 0
    #: characters per truncated-BPTT window (time steps backpropagated through)
    bptt: int = 128
    #: optimizer steps in the whole run (one step = one window on every rank)
    steps: int = 1000
    #: wall-clock budget of this start's training, Lightning's `max_time` form `DD:HH:MM:SS` (or `HH:MM:SS`, `MM:SS`, or seconds); at the step every rank settles at (a log step) where training to the next one would pass it, every rank checkpoints and the run exits 0 with one line, without the final evaluation; the same command continues with a new budget; empty: no budget
    max_time: str = ""

    # -- the peak learning rate and the rule that scales it to the model and batch (training/lr_rule.py)
    #: peak learning rate of one LSTM layer `lr_ref_hidden` units wide at a global batch of `lr_ref_batch` streams, reached after warm-up; `lr_scaling` gives other shapes theirs
    lr: float = 2e-2
    #: `rule`: peak = lr × (global / lr_ref_batch)^lr_batch_exponent × (lr_ref_hidden / hidden)^lr_width_exponent / layers^lr_depth_exponent (lstm_dist/training/lr_rule.py; global = `global_batch_size`, or world_size × batch_size streams without it); `none`: lr as written
    lr_scaling: Literal["rule", "none"] = "rule"
    #: global batch (streams) at which `lr` is the peak rate as written
    lr_ref_batch: int = 32
    #: how the peak rate follows the global batch: 0.5 is the square-root rule, 0 none (measured: 0, see docs/lr_sweep.md)
    lr_batch_exponent: float = 0.0
    #: model.hidden at which `lr` is the peak rate as written
    lr_ref_hidden: int = 256
    #: how the peak rate falls with the width: 1 is inverse to model.hidden, 0.5 its square root (measured: 0.5, see docs/lr_sweep.md)
    lr_width_exponent: float = 0.5
    #: how the peak rate falls with the depth: the rate is divided by model.layers to this power (measured: 1)
    lr_depth_exponent: float = 1.0

    # -- the schedule: warm-up to the peak, then the decay (training/optim.py)
    #: final learning rate at the end of the decay, as a fraction of the peak (`lr` after the rule)
    min_lr_ratio: float = 0.1
    #: steps of linear learning-rate warm-up from 0
    warmup_steps: int = 0
    #: decay after warm-up: `cosine`, `linear` or `constant`
    schedule: Literal["cosine", "linear", "constant"] = "cosine"

    # -- the optimizer and the gradient clipping before it
    #: optimizer: `adamw` or `sgd` (with momentum)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    #: decoupled weight decay (AdamW) or L2 (SGD); applied to matrices only, not biases or the embedding
    weight_decay: float = 0.01
    #: AdamW beta1 (0: no momentum, which trained every measured shape better than 0.9: docs/lr_sweep.md), or SGD momentum (with optimizer=sgd set it, e.g. 0.9)
    beta1: float = 0.0
    #: AdamW beta2
    beta2: float = 0.99
    #: clip the global gradient norm (after the all-reduce) to this; 0 turns clipping off
    clip_norm: float = 1.0

    # -- evaluation during the run
    #: run a validation pass every this many steps; 0 only at the end
    eval_every: int = 200
    #: cap on the windows scored in each validation stream during training (each after its window of context, not counted); 0 evaluates the whole split (the final evaluation always does)
    eval_max_windows: int = 0

    # -- failed steps and divergence (training/stopping.py)
    #: stop the run after this many consecutive failed steps (a non-finite loss or gradient, or a diverged loss: `divergence_ratio`); each one is skipped on every rank
    max_nonfinite: int = 5
    #: a step whose mean loss is above this × ln(vocabulary size), the loss of a uniform guess, has diverged: it fails like a non-finite one, and a final score above it (in bits: × log2 of the size) ends the run with exit 3, not `done`; 0 turns both checks off
    divergence_ratio: float = 3.0

    # -- the schedule of a resumed run whose settings changed
    #: when a resumed run's settings change its learning-rate schedule (train.steps, lr, warm-up, decay, the rule's inputs): `continue` goes on from the rate in force at the resume step along the new schedule to its new end, with no jump; `recompute` uses the new schedule as if the run had always had it
    resume_schedule: Literal["continue", "recompute"] = "continue"

    # -- the machine: process group, arithmetic, device, threads
    #: seconds a collective waits for the slowest rank before the job fails with an error (the process-group timeout): a rank that hangs or died stops the others after this long
    collective_timeout: float = 600.0
    #: arithmetic: `fp32`, `bf16` (autocast on CUDA; state and cell update stay fp32), or `auto` (bf16 on CUDA, fp32 on CPU)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: on CUDA, fp32 matrix products (torch's and cuDNN's) in TF32, as cuDNN's own LSTM does by default: tensor-core speed with a 10-bit mantissa in the products' inputs; `false` for full FP32 (no effect on the CPU, or on the products bf16 autocast runs in bf16)
    tf32: bool = True
    #: device: `auto` (CUDA when available, one GPU per local rank: GPU `LOCAL_RANK` where a process sees the node's GPUs, GPU 0 where a launcher gave each process one, e.g. `CUDA_VISIBLE_DEVICES` per process or Slurm's `--gpus-per-task=1`; a layout where the GPUs do not go round is one line), `cpu` or `cuda`
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: torch intra-op threads per process on the CPU; 0 divides the cores among the local processes
    threads: int = 0

    # -- the text samples logged at each evaluation
    #: characters of generated text logged at each evaluation; 0 turns samples off
    sample_chars: int = 200
    #: the text each sample continues (its tokens must be in the corpus's vocabulary)
    sample_prompt: str = "The "


@dataclass
class WandbConfig:
    #: Weights & Biases: `auto` (follows WANDB_MODE when set, else online when an API key is configured, else offline), `online`, `offline`, `disabled`; an explicit mode wins over WANDB_MODE, said in one line
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    #: W&B project name
    project: str = "lstm_dist"
    #: W&B entity (user or team); empty uses the account's default
    entity: str = ""
    #: seconds to wait for an online W&B start before falling back to offline
    init_timeout: float = 30.0
    #: W&B tags of the run, comma-separated (e.g. `wt103,baseline`)
    tags: str = ""
    #: W&B group the run belongs to (runs of one experiment side by side); empty: none
    group: str = ""
    #: W&B notes: a sentence on what the run is for
    notes: str = ""


@dataclass
class LogConfig:
    #: log a metrics line every this many steps
    every: int = 10
    #: the log line also shows where each step's time went (data, forward+backward, optimizer ms, outside forward+backward %); they are in metrics.jsonl and W&B either way
    timings: bool = False
    #: profile steps `A-B` (inclusive; or one step `A`) on rank 0 with torch.profiler: the trace goes to the run directory's `profile/` (Chrome trace JSON, opened by Perfetto and TensorBoard's profiler plugin), the top operations to the console; empty: off
    profile_steps: str = ""
    #: during an evaluation rank 0 prints how far it is (`evaluating valid: 23% (8,320 of 35,457 bytes on rank 0 of 2), 0.62s elapsed, ETA 2s`) at most every this many seconds; 0 after every window
    eval_progress_every: float = 30.0
    #: Weights & Biases settings (rank 0 only)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    #: write a checkpoint every this many steps; 0 only at the end and on preemption
    every: int = 500
    #: keep this many most recent checkpoints (older ones are deleted after a new one is written)
    keep: int = 3
    #: `auto` (latest valid checkpoint of the run directory, else start fresh), `never`, or a checkpoint file path
    resume: str = "auto"
    #: fine-tuning (nanoGPT's `init_from`): a checkpoint file or run directory whose model weights a run starting fresh begins from — step 0, a fresh optimizer and schedule, this config's settings; its own checkpoints resume as any run's; empty: random weights
    init_from: str = ""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


# Range rules: dotted key -> (predicate, what the value must be), for settings whose type alone allows
# values that make no sense. Applied in this order after every load (`checks.validate`) and to values
# code takes directly (`checks.check_setting`, `checks.check_option`).
def duration_seconds(text: str) -> typing.Optional[float]:
    """`train.max_time` in seconds: `DD:HH:MM:SS` (PyTorch Lightning's `max_time` string), `HH:MM:SS`, `MM:SS`
    or a number of seconds, above 0; math.inf for the empty string (no budget); None where the text is none
    of these (`RULES` then refuses it)."""
    text = text.strip()
    if not text:
        return math.inf
    parts = text.split(":")
    if len(parts) > 4:
        return None
    try:
        values = [float(x) for x in parts]
    except ValueError:
        return None
    if any(not math.isfinite(v) or v < 0 for v in values) or (len(parts) > 1 and any(v != int(v) for v in values[:-1])):
        return None
    seconds = sum(v * unit for v, unit in zip(reversed(values), (1, 60, 3600, 86400)))
    return seconds if seconds > 0 else None


def step_range(text: str) -> typing.Optional[tuple[int, int]]:
    """`log.profile_steps` as (first, last) steps, inclusive: `A-B` or `A`; (0, 0) for the empty string
    (off); None where the text is neither, or A < 1 or B < A (`RULES` then refuses it)."""
    text = text.strip()
    if not text:
        return (0, 0)
    a, _, b = text.partition("-")
    try:
        first, last = int(a), int(b or a)
    except ValueError:
        return None
    return (first, last) if 1 <= first <= last else None


RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "run.name": (lambda v: bool(v) and "/" not in v and v not in (".", ".."), "a non-empty name without '/'"),
    "run.dir": (lambda v: bool(v), "a non-empty path"),
    "run.seed": (lambda v: v >= 0, ">= 0"),
    "data.path": (lambda v: bool(v), "a non-empty path"),
    "model.embedding": (lambda v: v > 0, "> 0"),
    "model.hidden": (lambda v: v > 0, "> 0"),
    "model.layers": (lambda v: v > 0, "> 0"),
    "model.dropout": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "train.batch_size": (lambda v: v > 0, "> 0"),
    "train.global_batch_size": (lambda v: v >= 0, ">= 0 (0: world_size × batch_size)"),
    "train.bptt": (lambda v: v > 0, "> 0"),
    "train.steps": (lambda v: v > 0, "> 0"),
    "log.profile_steps": (lambda v: step_range(v) is not None, "empty, a step A >= 1, or A-B with 1 <= A <= B"),
    "train.sample_prompt": (lambda v: bool(v), "a non-empty text"),
    "train.max_time": (lambda v: duration_seconds(v) is not None, "empty, seconds, or DD:HH:MM:SS (HH:MM:SS, MM:SS) above 0"),
    "train.lr": (lambda v: v > 0, "> 0"),
    "train.lr_ref_batch": (lambda v: v > 0, "> 0 streams"),
    "train.lr_ref_hidden": (lambda v: v > 0, "> 0 units"),
    "train.lr_batch_exponent": (lambda v: 0.0 <= v <= 1.0, "in [0, 1] (0.5 is the square-root rule)"),
    "train.lr_width_exponent": (lambda v: 0.0 <= v <= 2.0, "in [0, 2] (1 is inverse to the width)"),
    "train.lr_depth_exponent": (lambda v: 0.0 <= v <= 3.0, "in [0, 3]"),
    "train.min_lr_ratio": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "train.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "train.weight_decay": (lambda v: v >= 0, ">= 0"),
    "train.beta1": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "train.beta2": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "train.clip_norm": (lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
    "train.eval_every": (lambda v: v >= 0, ">= 0 (0 evaluates only at the end)"),
    "train.eval_max_windows": (lambda v: v >= 0, ">= 0 (0 evaluates the whole split)"),
    "train.max_nonfinite": (lambda v: v > 0, "> 0"),
    "train.divergence_ratio": (lambda v: v == 0 or v > 1, "0 (off) or > 1 (a uniform guess scores 1)"),
    "train.threads": (lambda v: v >= 0, ">= 0 (0 divides the cores among the local processes)"),
    "train.sample_chars": (lambda v: v >= 0, ">= 0"),
    "log.every": (lambda v: v > 0, "> 0"),
    "log.eval_progress_every": (lambda v: v >= 0, ">= 0 seconds (0 prints a line after every window)"),
    "log.wandb.init_timeout": (lambda v: v > 0, "> 0 seconds"),
    "train.collective_timeout": (lambda v: v > 0, "> 0 seconds"),
    "checkpoint.every": (lambda v: v >= 0, ">= 0 (0 writes only at the end and on preemption)"),
    "checkpoint.keep": (lambda v: v > 0, "> 0"),
    "checkpoint.resume": (lambda v: bool(v), "'auto', 'never' or a checkpoint path"),
}


# --------------------------------------------------------------------------------------------
# Introspection: the fields of every section, their types, and values by dotted key.
# --------------------------------------------------------------------------------------------


def section_fields(cls: type) -> dict[str, Any]:
    """Field name -> type of one section (a dataclass above), in declaration order, types resolved."""
    return typing.get_type_hints(cls)


def is_section(tp: Any) -> bool:
    """Whether a field's type is a section (a dataclass of settings, such as `LogConfig.wandb`)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def leaf_fields(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> type, for every setting (`train.bptt` -> int, `log.wandb.mode` -> Literal[...]),
    in declaration order: the order of the reference."""
    out: dict[str, Any] = {}
    for name, tp in section_fields(cls).items():
        key = f"{prefix}{name}"
        if is_section(tp):
            out.update(leaf_fields(tp, key + "."))
        else:
            out[key] = tp
    return out


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every valid dotted key, sections included (`log`, `log.wandb`, `log.wandb.mode`)."""
    keys = []
    for name, tp in section_fields(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        if is_section(tp):
            keys.extend(all_keys(tp, key + "."))
    return keys


def value_at(cfg: Any, key: str) -> Any:
    """The value of dotted `key` in `cfg` (`value_at(cfg, "train.bptt")`); AttributeError for a key
    that is not there."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def set_value(cfg: Any, key: str, value: Any) -> None:
    """Set dotted `key` of `cfg` to `value`, unchecked (the loader checks first)."""
    *parents, last = key.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    setattr(cfg, last, value)
