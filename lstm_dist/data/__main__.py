"""The data command line: prepare a corpus directory, or time streaming from one.

    python -m lstm_dist.data prepare --source stdlib-docs --out data/stdlib-docs
    python -m lstm_dist.data prepare --source stdlib-docs --out data/stdlib-docs-chars --vocab chars
    python -m lstm_dist.data prepare --source wikitext103 --out data/wikitext103            # downloads 192 MB
    python -m lstm_dist.data prepare --source wikitext103 --zip wikitext-103-raw-v1.zip --out data/wikitext103
    python -m lstm_dist.data prepare --source files --train a.txt --valid b.txt --test c.txt --out data/mine
    python -m lstm_dist.data bench --size-mb 540          # open time, batches/s, private memory

Preparation is `lstm_dist.data.prepare`, reading `lstm_dist.data.corpus`, the windows `lstm_dist.data.streams`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from lstm_dist.data.corpus import SPLITS, VOCABS, Corpus, Vocab
from lstm_dist.common.errors import UserError, run_cli
from lstm_dist.config import DataConfig
from lstm_dist.data.prepare import prepare
from lstm_dist.data.sources import SOURCES

# torch is imported by `bench` only, not here: `prepare` never needs it, and importing it would add
# ~200 MB to the resident memory of a 540 MB preparation (and ~2 s to every CLI call).

# -------------------------------------------------------------------------------------- benchmark


def _memory() -> dict[str, int]:
    """kB from /proc/self/smaps_rollup: Rss (all resident pages, file-backed memmap pages
    included), Anonymous (private anonymous memory: heap, arrays, tensors) and Private_Dirty."""
    out = {}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Anonymous", "Private_Dirty"):
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def _make_bench_corpus(d: Path, size_mb: float) -> Path:
    """A bytes-vocab corpus whose train split is `size_mb` MB of generated text (reused if there)."""
    n = int(size_mb * 1e6)
    train = d / "train.bin"
    if (d / "meta.json").is_file() and train.is_file() and train.stat().st_size == n:
        return d
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b"etaoin shrdlu cmfwyp vbgkjqxz ETAOIN.,\n", dtype=np.uint8)
    with open(train, "wb") as f:
        left = n
        while left:
            m = min(left, 16 << 20)
            f.write(alphabet[rng.integers(0, len(alphabet), m)].tobytes())
            left -= m
    small = alphabet[rng.integers(0, len(alphabet), 100_000)].tobytes()
    for s in ("valid", "test"):
        (d / f"{s}.bin").write_bytes(small)
    splits = {s: {"bytes": (d / f"{s}.bin").stat().st_size, "tokens": (d / f"{s}.bin").stat().st_size} for s in SPLITS}
    (d / "vocab.json").write_text(json.dumps(Vocab("bytes").to_dict()))
    (d / "meta.json").write_text(json.dumps({"source": "bench", "vocab": {"kind": "bytes", "size": 256}, "splits": splits}))
    return d


def bench(size_mb: float = 540, batch: int = 512, bptt: int = 256, batches: int = 1000,
          dir: str | os.PathLike | None = None) -> dict:
    import tempfile

    import torch  # noqa: F401  (imported before measuring, so its own memory is not counted as the stream's)

    from lstm_dist.data.streams import TokenStream

    root = Path(dir) if dir is not None else Path(tempfile.gettempdir()) / "lstm_dist_bench"
    d = root / f"corpus-{size_mb:g}mb"
    t = time.perf_counter()
    _make_bench_corpus(d, size_mb)
    gen_s = time.perf_counter() - t
    mem0 = _memory()
    t = time.perf_counter()
    corpus = Corpus(d)
    stream = TokenStream(corpus.split("train"), 0, 1, batch, bptt, seed=0)
    first = stream.next()
    open_s = time.perf_counter() - t
    mem1 = _memory()
    t = time.perf_counter()
    for _ in range(batches - 1):
        b = stream.next()
    loop_s = time.perf_counter() - t
    mem2 = _memory()
    res = {"size_bytes": corpus.sizes["train"], "prepare_s": gen_s, "open_first_batch_s": open_s,
           "batches_per_s": (batches - 1) / loop_s, "chars_per_s": (batches - 1) * batch * bptt / loop_s,
           "mem_before": mem0, "mem_after_first": mem1, "mem_after": mem2, "shape": tuple(first.x.shape)}
    del b
    return res


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lstm_dist.data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="prepare a corpus directory from a source")
    p.add_argument("--source", required=True, choices=SOURCES, help="where the text comes from")
    p.add_argument("--out", required=True, help="corpus directory to create")
    p.add_argument("--vocab", default=DataConfig.vocab, choices=VOCABS, help="bytes (uint8, default) or chars (uint16)")
    p.add_argument("--force", action="store_true", help="replace an existing different corpus at --out")
    g = p.add_argument_group("wikitext103")
    g.add_argument("--zip", help="local copy of wikitext-103-raw-v1.zip (no download)")
    g.add_argument("--dir", help="directory already holding wiki.train.raw, wiki.valid.raw, wiki.test.raw")
    g.add_argument("--url", help="download address (default: the canonical S3 address)")
    g.add_argument("--sha256", help="expected sha256 of the archive (default: the real release's)")
    g.add_argument("--cache-dir", help="download cache (default: $LSTM_DIST_CACHE or ~/.cache/lstm_dist)")
    g.add_argument("--retries", type=int, help="resume attempts within one run after an interrupted download (default 3)")
    g = p.add_argument_group("files")
    for s in SPLITS:
        g.add_argument(f"--{s}", help=f"UTF-8 text file of the {s} split")
    b = sub.add_parser("bench", help="time opening a split and streaming batches; show memory")
    b.add_argument("--size-mb", type=float, default=540.0, help="size of the generated train split in MB")
    b.add_argument("--batch", type=int, default=512)
    b.add_argument("--bptt", type=int, default=256)
    b.add_argument("--batches", type=int, default=1000)
    b.add_argument("--dir", help="where to generate (and reuse) the corpus (default: $TMPDIR/lstm_dist_bench)")
    args = ap.parse_args(argv)

    if args.cmd == "prepare":
        opts = {k: getattr(args, k) for k in ("zip", "dir", "url", "sha256", "cache_dir", "retries", "train", "valid", "test")}
        prepare(args.source, args.out, vocab=args.vocab, force=args.force, **opts)
        return 0

    if args.batches < 2 or args.batch < 1 or args.bptt < 1 or args.size_mb <= 0:
        raise UserError("bench needs --batches >= 2 and positive --batch, --bptt, --size-mb")
    r = bench(args.size_mb, args.batch, args.bptt, args.batches, args.dir)
    mb = lambda kb: f"{kb / 1024:.1f} MiB"
    fmt = lambda m: ", ".join(f"{k} {mb(v)}" for k, v in m.items())
    print(f"split: {r['size_bytes']:,} bytes (generated/reused in {r['prepare_s']:.2f}s)")
    print(f"open (Corpus + memmap + TokenStream) and first batch {r['shape']}: {r['open_first_batch_s'] * 1e3:.1f} ms")
    print(f"streaming: {r['batches_per_s']:.1f} batches/s at batch {args.batch} x bptt {args.bptt} ({r['chars_per_s'] / 1e6:.1f} M chars/s)")
    print("memory from /proc/self/smaps_rollup (Anonymous = private anonymous memory; Rss includes memmapped file pages):")
    print(f"  before opening:          {fmt(r['mem_before'])}")
    print(f"  after the first batch:   {fmt(r['mem_after_first'])}")
    print(f"  after {args.batches} batches:      {fmt(r['mem_after'])}")
    return 0


if __name__ == "__main__":
    run_cli(main)
