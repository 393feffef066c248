"""A trained model back from its checkpoint alone, for the inference entry points (generate, evaluate).

A checkpoint carries everything needed to rebuild the model: the run's config (model shape, impl)
and its vocabulary. `load_model` reads the file (or a run directory's latest checkpoint), chooses the
kernels with `lstm_dist.model.kernels.choose_kernels` for the checkpoint's `model.impl` with
`model.compile` off (inference runs step by step or window by window, where compiling the pointwise
step saves nothing and costs seconds; on the CPU that is the C++ loops where they build), rebuilds
`CharLSTM`, loads the weights and returns the model in eval mode on the requested device. Every way this can fail because of what the user passed ends in
a one-line `UserError`.

Also here, shared by both entry points: an argument parser whose errors are one line too. The text they
read (`--text`, `--prompt`, `--prompt-file`) is read by `lstm_dist.corpus` in the one way a corpus
split is read (`read_text_file`, `check_utf8_file`, `text_from_string`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from lstm_dist.training import checkpoint as ckpt
from lstm_dist import config as config_mod
from lstm_dist.config import Config
from lstm_dist.data.corpus import Vocab
from lstm_dist.common.errors import UserError, first_line
from lstm_dist.model.char_lstm import CharLSTM
from lstm_dist.model.kernels import choose_kernels


class LoadedModel(NamedTuple):
    model: CharLSTM
    vocab: Vocab
    cfg: Config
    path: Path  # the checkpoint file actually read
    step: int  # the training step it was written at


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad option ends in one line `error: ...` and exit 2 like every other user error."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message}; see {self.prog} --help")


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def load_model(source: str | Path, device: torch.device | str = "cpu", *, precision: str = "fp32",
               say: Optional[Callable[[str], None]] = None) -> LoadedModel:
    """Rebuild the model of a checkpoint file, or of a run directory's latest checkpoint, on `device`.

    `precision` is handed to `choose_kernels` as `train.precision` (the model's `kernels.bf16`, and
    its `autocast()`); `say` gets its lines (a fallback warning; default: stderr). Under torchrun every
    rank must call it (the kernel choice is agreed by all ranks). Errors: one-line UserErrors
    (`CheckpointError`) for a missing, foreign or damaged checkpoint."""
    path = ckpt.resolve(source)
    saved = ckpt.load(path, map_location="cpu")
    missing = [k for k in ("config", "vocab") if k not in saved]
    if missing:
        raise ckpt.CheckpointError(f"checkpoint {path} lacks {' and '.join(missing)}; it was not written by "
                                   "lstm_dist.train, use a checkpoint of a training run")
    cfg = config_mod.from_dict(saved["config"], source=f"the config inside checkpoint {path}")
    vocab = Vocab.from_dict(saved["vocab"])
    model_cfg = dataclasses.replace(cfg.model, compile=False)
    device = torch.device(device)
    kernels = choose_kernels(model_cfg, precision, device, batch=1, say=say or _to_stderr)
    model = CharLSTM.from_config(model_cfg, vocab.size, kernels=kernels)
    try:
        model.load_state_dict(saved["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise ckpt.CheckpointError(f"checkpoint {path} does not fit the model its own config describes "
                                   f"({first_line(exc)}); "
                                   "the file is damaged, use another checkpoint") from None
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model, vocab, cfg, path, int(saved.get("step", 0)))
