"""Generate text from a trained checkpoint: `python -m lstm_dist.generate --checkpoint RUN_DIR_OR_FILE`.

    python -m lstm_dist.generate --checkpoint runs/smoke                  # the run's latest checkpoint
    python -m lstm_dist.generate --checkpoint runs/smoke/checkpoints/step_00000500.pt \\
        --prompt "The river" --max-new-tokens 1000 --temperature 0.7 --top-p 0.9 --seed 3
    python -m lstm_dist.generate --checkpoint runs/smoke --num-samples 4 --json > samples.json

The model is rebuilt from the checkpoint alone (its config and vocabulary are inside). The prompt
goes through the model once; then each character is one `step()` on the carried state, so the cost
per character does not grow with the text. The same checkpoint, settings, seed and device give
the same text.

The prompt is read exactly as `prepare` reads a corpus split (`lstm_dist.data.corpus`), so its characters
and ids are those the same text has in a prepared corpus. `--prompt-file FILE` is used verbatim: its
bytes as strict UTF-8, nothing translated, so a CR stays a character (CRLF line ends are `\r\n`) and a
byte-order mark at the start stays the character U+FEFF (the bytes EF BB BF with the bytes
vocabulary); a file that is not UTF-8 is refused in one line naming the byte offset. `--prompt TEXT`
is taken as given (a command-line byte that is not UTF-8 is refused). With a chars vocabulary, a prompt
holding characters the checkpoint's vocabulary lacks (a CR or a BOM too, when its training split had
none) is refused in one line that names them and the option they came from.

The options take Hugging Face's and nanoGPT's names (`max_new_tokens`, `temperature`, `top_k`, `top_p`,
`seed`, `num_samples`); `--length`, the old name of `--max-new-tokens`, still works (not in --help).

Output: the prompt and its continuation stream to stdout as they are produced. `--max-new-tokens`
counts the model's tokens: characters with a chars vocabulary, UTF-8 bytes with the bytes vocabulary,
whose output is decoded incrementally (a character is printed once all its bytes are there; an
invalid sequence prints as U+FFFD). With `--num-samples N` > 1 the samples are drawn as one batch:
each is printed after a header line `--- sample i/N ---`; sample 1 streams live, the others are
printed when the batch is done (they finish at the same moment). A summary line (tokens drawn, in
bytes or characters as the vocabulary counts them, seconds, tokens per second) goes to stderr.
`--json` prints one JSON object instead: prompt, samples (the continuations), settings (by the
options' names: max_new_tokens, ...), checkpoint, step, chars_per_s (tokens per second).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lstm_dist.data.corpus import lacking_note, read_text_file, text_from_string
from lstm_dist.common.errors import UserError, run_cli
from lstm_dist.common.distributed import pick_device
from lstm_dist.config import TrainConfig, choices
from lstm_dist.inference.load import ArgumentParser, load_model
from lstm_dist.inference.sampling import DEFAULT_TEMPERATURE, TextDecoder, check_settings, generate

DEFAULT_PROMPT = "I plan to make the world a better place by"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m lstm_dist.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint file, or a run directory (its latest checkpoint)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT", help=f"text to continue (default: {DEFAULT_PROMPT!r})")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file, used verbatim (CR and a BOM are characters)")
    p.add_argument("--max-new-tokens", type=int, default=500, metavar="N",
                   help="tokens to generate per sample: characters (chars vocab) or UTF-8 bytes (bytes vocab); default 500")
    p.add_argument("--length", type=int, dest="max_new_tokens", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the old name of --max-new-tokens, kept for scripts that use it
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, metavar="T",
                   help=f"softmax temperature; 0 picks the most likely character (greedy); default {DEFAULT_TEMPERATURE}")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="draw among the K most likely only; 0 (default) keeps all")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="draw among the most likely characters holding probability P, in (0, 1]; 1 (default) keeps all")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same text (default 0)")
    p.add_argument("--num-samples", type=int, default=1, metavar="N", help="samples, drawn as one batch (default 1)")
    p.add_argument("--device", choices=choices("train.device"), default=TrainConfig.device,
                   help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="torch CPU threads; 0 (default) leaves torch's choice")
    p.add_argument("--json", action="store_true", help="print one JSON object with the samples instead of streaming text")
    return p


def read_prompt(args) -> tuple[str, str]:
    """(the prompt, where it came from: ``--prompt``, ``--prompt-file FILE`` or ``the default prompt``),
    read as a corpus split is read (`lstm_dist.data.corpus.read_text_file` / `text_from_string`).
    Errors: one-line `UserError`s (a file missing or not UTF-8, undecodable command-line bytes, empty)."""
    if args.prompt_file is None:
        where = "--prompt" if args.prompt is not None else "the default prompt"
        prompt = text_from_string(DEFAULT_PROMPT if args.prompt is None else args.prompt, where)
    else:
        where = f"--prompt-file {args.prompt_file}"
        prompt = read_text_file(Path(args.prompt_file), where)
    if not prompt:
        raise UserError(f"{where} is empty; the model needs at least one character to continue")
    return prompt, where


def check_args(args) -> None:
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    try:
        check_settings(args.temperature, args.top_k, args.top_p, names=("--temperature", "--top-k", "--top-p"))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0 (0 leaves torch's choice), got {args.threads}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    prompt, where = read_prompt(args)
    device = pick_device(args.device, setting="--device ")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, vocab, _, path, step = load_model(args.checkpoint, device)
    unknown = vocab.unknown(prompt)
    if unknown:
        raise UserError(lacking_note("the prompt", unknown, f"remove or replace them in {where}"))
    n = args.num_samples
    out = sys.stdout
    if hasattr(out, "reconfigure"):
        out.reconfigure(errors="replace")  # a terminal that cannot show a character gets '?', not a crash
    live = None if args.json else TextDecoder(vocab)  # sample 1, streamed
    if live is not None:
        out.write((f"--- sample 1/{n} ---\n" if n > 1 else "") + prompt)
        out.flush()

    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    chunks = []
    t0 = time.perf_counter()
    for chunk in generate(model, vocab.encode(prompt).tolist(), args.max_new_tokens, num_samples=n,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=gen):
        chunks.append(chunk)
        if live is not None:
            out.write(live.decode(chunk[:, 0].tolist()))
            out.flush()
    seconds = time.perf_counter() - t0
    ids = torch.cat(chunks) if chunks else torch.empty(0, n, dtype=torch.long)
    rate = args.max_new_tokens * n / seconds if seconds > 0 else 0.0

    if args.json:
        samples = [TextDecoder(vocab).decode(ids[:, i].tolist(), final=True) for i in range(n)]
        json.dump({"checkpoint": str(path), "step": step, "prompt": prompt, "samples": samples,
                   "settings": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                                "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed, "num_samples": n,
                                "device": str(device), "threads": torch.get_num_threads()},
                   "seconds": seconds, "chars_per_s": rate}, out)
        out.write("\n")
    else:
        out.write(live.decode([], final=True) + "\n")
        for i in range(1, n):
            out.write(f"--- sample {i + 1}/{n} ---\n{prompt}{TextDecoder(vocab).decode(ids[:, i].tolist(), final=True)}\n")
        out.flush()
        unit = "bytes" if vocab.kind == "bytes" else "characters"  # what a token is in this vocabulary
        print(f"[{args.max_new_tokens * n:,} {unit} in {seconds:.2f} s: {rate:,.0f} {unit}/s; checkpoint {path} "
              f"(step {step}) on {device}]", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
