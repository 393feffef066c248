"""Bits per byte (or per character) of a checkpoint over a whole split or any text: `python -m lstm_dist.evaluate`.

    python -m lstm_dist.evaluate --checkpoint runs/smoke                        # the run's valid split
    python -m lstm_dist.evaluate --checkpoint runs/smoke --split test --json
    python -m lstm_dist.evaluate --checkpoint runs/smoke/checkpoints/step_00000500.pt --text notes.txt
    torchrun --standalone --nproc_per_node=2 -m lstm_dist.evaluate --checkpoint runs/smoke --split test

The model is rebuilt from the checkpoint alone. The split comes from the run's corpus (`data.path`
in the checkpoint's config, relative to the working directory as in training; `--data` points
elsewhere). `--text FILE` scores any UTF-8 text, encoded with the checkpoint's vocabulary; with a
chars vocabulary, characters it lacks are scored as its unknown id, and counted and reported.

`--text FILE` is read exactly as `prepare` reads a corpus split (`lstm_dist.data.corpus.utf8_chunks`), so
a file scores the same whether it is a prepared split or `--text`: its bytes are strict UTF-8, with
nothing translated. A CR stays a character (CRLF line ends are two characters, `\r` and `\n`, as in a
prepared split), and a byte-order mark at the start stays the character U+FEFF (the bytes EF BB BF with
the bytes vocabulary). A chars vocabulary whose training split had neither scores them as its unknown
id, and the note line names them. A file that is not UTF-8 is refused in one line naming the byte
offset, with either vocabulary (the bytes vocabulary memory-maps the file after checking it in chunks).

Every token but the first is predicted exactly once (`streams.eval_batches`), from the text before it:
the text is cut into world × batch contiguous segments, each read window by window (`--bptt`) with the
state carried between windows, and each but the first starts from a zero state one training window
(the checkpoint's train.bptt) before its first scored token, reading that context unscored. The ranks'
sums are added up (`scoring.split_bits`, the same code as training's evaluations). So the score
barely depends on the number of streams or processes (within 0.001 bits from 1 to 1,024 streams:
docs/scoring.md), and a layout of the same world × batch gives the same bits exactly.
The tokens are bytes with the bytes vocabulary and characters with the chars vocabulary, and the
score is named after them everywhere (docs/scoring.md): output is one line (bytes scored, total bits,
bits per byte; or characters, bits per character), or with `--json` one JSON object with
bytes, bits, bpb (chars, bits, bpc) and the settings. Only rank 0 prints; a long scoring also says how
far it is on stderr at most every `--progress-every` seconds (`evaluating test: 43% (41,088 of
94,793 bytes), 4.1s elapsed, ETA 5.3s`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lstm_dist.data.corpus import Corpus, check_utf8_file, lacking_note, open_text_file, utf8_chunks
from lstm_dist.common.distributed import cpu_threads, setup
from lstm_dist.common.errors import UserError, run_cli
from lstm_dist.config import LogConfig, TrainConfig, check_option, choices
from lstm_dist.inference.load import ArgumentParser, load_model
from lstm_dist.inference.scoring import ProgressLine, split_bits


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m lstm_dist.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint file, or a run directory (its latest checkpoint)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--split", choices=("valid", "test"), default=None, help="split of the run's corpus (default valid)")
    src.add_argument("--text", metavar="FILE", help="score this UTF-8 text file instead of a split")
    p.add_argument("--data", metavar="PATH", help="corpus directory to read the split from (default: the run's data.path)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", dest="batch",
                   help="segments (streams) per process (default: the run's train.batch_size)")
    p.add_argument("--batch", type=int, dest="batch", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old name
    p.add_argument("--bptt", type=int, default=None, metavar="N", help="characters per window (default: the run's train.bptt)")
    p.add_argument("--device", choices=choices("train.device"), default=TrainConfig.device,
                   help="auto (one GPU per local rank if any), cpu or cuda")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="as train.precision: bf16 runs the matrix products in bf16 on CUDA (as training evaluates "
                        "there; no effect on the CPU); default fp32")
    p.add_argument("--bf16", action="store_const", const="bf16", dest="precision", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the old name of --precision bf16
    p.add_argument("--threads", type=int, default=TrainConfig.threads, metavar="N",
                   help="torch CPU threads per process; 0 (default) divides the cores among the local processes")
    p.add_argument("--progress-every", type=float, default=LogConfig.eval_progress_every, metavar="SECONDS",
                   help="rank 0 says how far the scoring is on stderr at most every SECONDS (0: after every window; "
                        f"default {LogConfig.eval_progress_every:g}, as log.eval_progress_every)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a line")
    return p


def parse_args(argv: list[str] | None = None):
    """The command line (`build_parser`), with `args.bf16` (bool) for `--precision bf16`. Errors: one-line
    UserErrors (`inference.load.ArgumentParser`)."""
    args = build_parser().parse_args(argv)
    args.bf16 = args.precision == "bf16"
    return args


def read_text(path: Path, vocab) -> tuple[np.ndarray, int, list[str]]:
    """(ids, unknown count, distinct unknown characters, sorted) of the text file `path` in `vocab`,
    read as `prepare` reads a corpus split (strict UTF-8; CR and a BOM kept as characters), so the ids
    are those of the same file prepared as a split. Bytes vocabulary: the file is checked in chunks,
    then memory-mapped (its bytes are the ids). Chars vocabulary: encoded chunk by chunk (2 bytes per
    character). Errors: one-line `UserError`s naming `--text FILE` (missing, a directory, unreadable,
    not UTF-8 with the byte offset)."""
    name = f"--text {path}"
    hint = "pass a text file (or --data DIR --split NAME for a corpus)"
    if vocab.kind == "bytes":
        if check_utf8_file(path, name, hint) == 0:
            return np.zeros(0, dtype=np.uint8), 0, []
        return np.memmap(path, dtype=np.uint8, mode="r"), 0, []
    pieces, missing, lacking = [], 0, set()
    with open_text_file(path, name, hint) as stream:
        for _, text in utf8_chunks(stream, name):
            if not text:
                continue
            ids = vocab.encode(text)
            miss = int(np.count_nonzero(ids == vocab.unknown_id))
            if miss:
                missing += miss
                lacking.update(vocab.unknown(text))
            pieces.append(ids)
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=vocab.dtype)
    return ids, missing, sorted(lacking)


def open_split(args, cfg, vocab) -> tuple[np.ndarray, str, int]:
    """(ids, description, unknown count as prepared) of the requested split."""
    path = Path(args.data if args.data is not None else cfg.data.path)
    if not path.exists():
        raise UserError(f"corpus {path} ({'--data' if args.data is not None else 'data.path in the checkpoint config'}) "
                        "does not exist here; pass --data DIR of a prepared copy of the run's corpus, or --text FILE")
    corpus = Corpus(path)
    if corpus.vocab != vocab:
        raise UserError(f"the corpus {path} has a {corpus.vocab.kind} vocabulary of {corpus.vocab.size} ids, not the one "
                        "the checkpoint was trained on; pass --data DIR of the corpus it was trained on, or --text FILE")
    split = args.split or "valid"
    unknown = int(corpus.meta.get("unknown_chars", {}).get(split, 0) or 0)
    return corpus.split(split), f"{split} split of {path}", unknown


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The options stand for these settings of the run, whose range rules they follow.
    for dest, key, option in (("batch", "train.batch_size", "--batch-size"), ("bptt", "train.bptt", "--bptt"),
                              ("threads", "train.threads", "--threads"),
                              ("progress_every", "log.eval_progress_every", "--progress-every")):
        if getattr(args, dest) is not None:
            check_option(key, getattr(args, dest), option)
    if args.text is not None and args.data is not None:
        raise UserError("--data selects the corpus of a --split; with --text FILE leave it out")
    with setup(args.device, setting="--device ") as env:
        if env.device.type == "cpu":
            torch.set_num_threads(cpu_threads(args.threads, env.local_world))
        model, vocab, cfg, path, step = load_model(args.checkpoint, env.device)
        unknown_distinct: list[str] = []
        if args.text is not None:
            data, unknown, unknown_distinct = read_text(Path(args.text), vocab)
            what = f"--text {args.text}"
        else:
            data, what, unknown = open_split(args, cfg, vocab)
        if len(data) < 2:
            raise UserError(f"{what} has {len(data)} token(s); at least 2 are needed (the first is only context)")
        batch = args.batch or cfg.train.batch_size
        bptt = args.bptt or cfg.train.bptt
        t0 = time.perf_counter()
        context = cfg.train.bptt  # one window of the model's training: as long a context as training's evaluations
        say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731 - stdout is the result's
        label = (args.split or "valid") if args.text is None else Path(args.text).name
        progress = (ProgressLine(label, vocab.units.count, args.progress_every, say, env.rank, env.world)
                    if env.is_main else None)
        bits, count = split_bits(model, data, rank=env.rank, world=env.world, batch=batch, bptt=bptt,
                                 device=env.device, bf16=args.bf16, context=context, progress=progress)
        seconds = time.perf_counter() - t0
        if not env.is_main:
            return 0
        u = vocab.units
        result = {u.count: count, "bits": bits, u.score: bits / count, "source": what, "checkpoint": str(path),
                  "step": step, "vocab": vocab.kind, "unknown_chars": unknown,
                  "unknown_distinct": unknown_distinct[:50], "world": env.world, "batch": batch, "bptt": bptt,
                  "context": context,
                  "device": str(env.device), "bf16": bool(args.bf16 and env.device.type == "cuda"),
                  "seconds": seconds, f"{u.count}_per_s": count / seconds if seconds > 0 else 0.0}
        if args.json:
            print(json.dumps(result), flush=True)
            return 0
        if unknown:
            print("note: " + lacking_note(what, unknown_distinct, "they are scored as its unknown id", count=unknown),
                  file=sys.stderr)
        print(f"{what}: {count:,} {u.token}s scored, {bits:,.4f} bits, {bits / count:.4f} {u.per} "
              f"(checkpoint {path}, step {step}; {env.world} process(es) × {batch} streams × bptt {bptt}, "
              f"context {context}; {seconds:.2f} s)", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
