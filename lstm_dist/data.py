"""Vocabularies, corpus preparation, and the memory-mapped token stream the trainer reads.

Prepare a corpus once (a directory of raw token arrays plus vocab.json and meta.json)::

    python -m lstm_dist.data prepare --source stdlib-docs --out data/stdlib-docs
    python -m lstm_dist.data prepare --source stdlib-docs --out data/stdlib-docs-chars --vocab chars
    python -m lstm_dist.data prepare --source wikitext103 --out data/wikitext103            # downloads 192 MB
    python -m lstm_dist.data prepare --source wikitext103 --zip wikitext-103-raw-v1.zip --out data/wikitext103
    python -m lstm_dist.data prepare --source files --train a.txt --valid b.txt --test c.txt --out data/mine
    python -m lstm_dist.data bench --size-mb 540          # open time, batches/s, private memory

Vocabularies:

- ``bytes`` (default): the 256 byte values of the UTF-8 text. A prepared split is the text's bytes
  as uint8, so every text can be encoded and nothing is ever unknown.
- ``chars``: the Unicode characters that occur in the training split, sorted by code point, ids
  0..n-1 as uint16, plus one reserved id n for any character the training split never had
  (counted and reported when valid/test are prepared).

Streams for training (`TokenStream`): the split, after a per-epoch offset, is cut into
``world*batch`` contiguous streams of equal length; rank r reads streams [r*batch, (r+1)*batch) and
window k of every stream covers its characters [k*bptt, k*bptt+bptt] (x is the first bptt of them,
y the last bptt). Ranks never share a training character in one epoch. Evaluation (`eval_batches`)
instead covers every predictable position of a split exactly once, the short tail included.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple

import numpy as np

import lstm_dist
from lstm_dist.errors import UserError, run_cli
from lstm_dist.wikitext import SOURCES, SPLITS, SplitInput, source_inputs

# torch is imported where tensors are made, not here: `prepare` never needs it, and importing it
# would add ~200 MB to the resident memory of a 540 MB preparation (and ~2 s to every CLI call).

VOCABS = ("bytes", "chars")
# Read/encode granularity: bounds peak memory whatever the file size. Kept small (well under glibc's
# 32 MB mmap ceiling) so the per-chunk temporaries are reused from the heap instead of fragmenting it.
CHUNK_BYTES = 2 << 20

# Where each built-in source lives by default, relative to the working directory. A directory
# whose last component is one of these names (or that name + "-chars", meaning the chars
# vocabulary) is recognised by `builtin_source_for`, so a trainer pointed at a missing default
# directory can prepare it itself. wikitext103 can only be prepared that way when its archive can
# be downloaded (or is already in the cache).
DEFAULT_DIRS = {"stdlib-docs": "data/stdlib-docs", "wikitext103": "data/wikitext103"}
CHARS_SUFFIX = "-chars"


def builtin_source_for(path: str | os.PathLike) -> str | None:
    """The built-in source whose default directory name `path` ends in ('stdlib-docs' for
    .../stdlib-docs or .../stdlib-docs-chars, 'wikitext103' likewise), else None."""
    name = Path(path).name
    for source in DEFAULT_DIRS:
        if name in (source, source + CHARS_SUFFIX):
            return source
    return None


def builtin_vocab_for(path: str | os.PathLike) -> str:
    """'chars' for a directory named `<source>-chars`, else 'bytes'."""
    return "chars" if Path(path).name.endswith(CHARS_SUFFIX) else "bytes"


def _prepare_hint(path: str | os.PathLike, source: str | None = None, vocab: str | None = None) -> str:
    source = source or builtin_source_for(path) or "stdlib-docs|wikitext103|files"
    vocab = vocab or builtin_vocab_for(path)
    extra = f" --vocab {vocab}" if vocab != "bytes" else ""
    return f"python -m lstm_dist.data prepare --source {source} --out {path}{extra}"


# -------------------------------------------------------------------------------------- vocabulary


class Vocab:
    """A character vocabulary: 'bytes' (256 ids, uint8) or 'chars' (the training split's
    characters + one unknown id, uint16)."""

    def __init__(self, kind: str, chars: str | None = None) -> None:
        if kind not in VOCABS:
            raise UserError(f"unknown vocabulary {kind!r}; choose one of {', '.join(VOCABS)}")
        self.kind = kind
        if kind == "bytes":
            self.chars = None
            self.size = 256
            self.dtype = np.uint8
            self.unknown_id = None
            return
        chars = "".join(sorted(set(chars or "")))
        if len(chars) + 1 > 65536:
            raise UserError(f"the training text has {len(chars)} distinct characters, more than a uint16 chars vocabulary holds; use --vocab bytes")
        self.chars = chars
        self.size = len(chars) + 1
        self.dtype = np.uint16
        self.unknown_id = len(chars)  # the reserved id: a character the training split never had
        self._lut: np.ndarray | None = None
        self._index = {c: i for i, c in enumerate(chars)}

    @property
    def lut(self) -> np.ndarray:
        """Code point -> id for every Unicode code point (unknown id where absent); 2.2 MB."""
        if self._lut is None:
            lut = np.full(0x110000, self.unknown_id, dtype=np.uint16)
            lut[np.array([ord(c) for c in self.chars], dtype=np.int64)] = np.arange(len(self.chars), dtype=np.uint16)
            self._lut = lut
        return self._lut

    def encode(self, text: str) -> np.ndarray:
        if self.kind == "bytes":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()
        return self.lut[_code_points(text)]

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if self.kind == "bytes":
            return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        table = self.chars + "\ufffd"
        return "".join(table[i] if 0 <= i < self.size else "\ufffd" for i in ids.tolist())

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of `text` this vocabulary lacks (sorted); always [] for bytes."""
        if self.kind == "bytes":
            return []
        return sorted(c for c in set(text) if c not in self._index)

    def to_dict(self) -> dict:
        """Plain Python values only (str/int), so a checkpoint loads with weights_only=True."""
        if self.kind == "bytes":
            return {"kind": "bytes", "size": 256}
        return {"kind": "chars", "size": self.size, "chars": self.chars, "unknown_id": self.unknown_id}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        if not isinstance(d, dict) or d.get("kind") not in VOCABS:
            raise UserError(f"vocabulary description {str(d)[:80]!r} has no valid 'kind'; re-prepare the corpus")
        v = cls(d["kind"], d.get("chars"))
        if "size" in d and d["size"] != v.size:
            raise UserError(f"vocabulary says size {d['size']} but its characters give {v.size}; the vocab.json is damaged, re-prepare the corpus")
        return v

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Vocab({self.kind!r}, size={self.size})"


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def load_vocab(corpus_dir: str | os.PathLike) -> Vocab:
    path = Path(corpus_dir) / "vocab.json"
    if not path.is_file():
        raise UserError(f"{path} is missing; prepare the corpus with: {_prepare_hint(corpus_dir)}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise UserError(f"{path} is not readable JSON ({exc}); re-prepare the corpus with --force")
    return Vocab.from_dict(d)


# ------------------------------------------------------------------------------------- preparation


def _chunks(inp: SplitInput) -> Iterator[bytes]:
    stream: BinaryIO = inp.open()
    try:
        while chunk := stream.read(CHUNK_BYTES):
            yield chunk
    finally:
        stream.close()


def _decoded_chunks(inp: SplitInput) -> Iterator[tuple[bytes, str]]:
    """(raw chunk, its text) in order. The incremental decoder holds back a character split across
    a chunk boundary until the next chunk; invalid UTF-8 becomes a UserError with its offset."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    try:
        for raw in _chunks(inp):
            yield raw, dec.decode(raw)
            offset += len(raw)
        yield b"", dec.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise UserError(f"{inp.name} is not valid UTF-8 near byte {offset + exc.start}; convert it to UTF-8 first")


def _scan(inp: SplitInput, want_chars: bool) -> dict:
    """One streaming pass: sha256, byte and character counts, and (optionally) the character set."""
    h = hashlib.sha256()
    n_bytes = n_chars = 0
    seen = np.zeros(0x110000, dtype=bool) if want_chars else None  # by code point
    for raw, text in _decoded_chunks(inp):
        h.update(raw)
        n_bytes += len(raw)
        n_chars += len(text)
        if want_chars and text:
            seen[_code_points(text)] = True
    out = {"sha256": h.hexdigest(), "bytes": n_bytes, "chars": n_chars}
    if want_chars:
        out["charset"] = "".join(map(chr, np.flatnonzero(seen).tolist()))
    return out


def _write_split(inp: SplitInput, vocab: Vocab, dest: Path) -> dict:
    """Encode one split chunk by chunk into `dest`; returns its sizes, hash and unknown counts."""
    h = hashlib.sha256()
    n_bytes = n_chars = n_tokens = n_unknown = 0
    unknown: set[str] = set()
    buf = np.empty(CHUNK_BYTES, dtype=vocab.dtype) if vocab.kind == "chars" else None  # reused per chunk
    with open(dest, "wb") as out:
        for raw, text in _decoded_chunks(inp):
            h.update(raw)
            n_bytes += len(raw)
            n_chars += len(text)
            if vocab.kind == "bytes":
                out.write(raw)  # the text's own bytes, no encoding pass
                n_tokens += len(raw)
            elif text:
                cps = _code_points(text)
                if len(cps) > len(buf):
                    buf = np.empty(len(cps), dtype=vocab.dtype)
                ids = buf[:len(cps)]
                np.take(vocab.lut, cps, out=ids)
                miss = int(np.count_nonzero(ids == vocab.unknown_id))
                if miss:
                    n_unknown += miss
                    unknown.update(vocab.unknown(text))
                out.write(memoryview(ids))
                n_tokens += len(ids)
        out.flush()
        os.fsync(out.fileno())
    return {"input": inp.name, "sha256": h.hexdigest(), "bytes": n_bytes, "chars": n_chars,
            "tokens": n_tokens, "unknown_chars": n_unknown, "unknown_distinct": len(unknown)}


def _same_corpus(a: dict, b: dict) -> bool:
    """Same inputs and same vocabulary: the directory already holds what we would write."""
    key = lambda m: (m.get("vocab"), {s: (v.get("sha256"), v.get("tokens")) for s, v in m.get("splits", {}).items()})
    return key(a) == key(b)


def prepare(source: str, out: str | os.PathLike, vocab: str = "bytes", force: bool = False,
            quiet: bool = False, **source_options) -> Path:
    """Prepare `source` into the corpus directory `out` and return its path.

    Writes train.bin/valid.bin/test.bin, vocab.json and meta.json into a temporary directory next
    to `out` and renames it into place, so a failed run leaves no half corpus. If `out` already
    holds the same corpus (same input hashes and vocabulary) it is kept as is; a different one is
    replaced only with `force=True`. `source_options` go to `lstm_dist.wikitext.source_inputs`.
    Call it on one process per machine: concurrent calls are safe but do the work twice.
    """
    if vocab not in VOCABS:
        raise UserError(f"unknown vocabulary {vocab!r}; choose one of {', '.join(VOCABS)}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / "meta.json").is_file() and not force:
        raise UserError(f"--out {out} is a non-empty directory that is not a prepared corpus; choose another --out or pass --force to replace it")
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    t0 = time.monotonic()
    inputs = source_inputs(source, **source_options)

    say(f"preparing {source} with the {vocab} vocabulary into {out}")
    if vocab == "chars":
        scan = _scan(inputs["train"], want_chars=True)
        voc = Vocab("chars", scan["charset"])
        say(f"  train has {len(scan['charset'])} distinct characters; vocabulary size {voc.size}")
    else:
        voc = Vocab("bytes")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        splits = {}
        for split in SPLITS:
            info = _write_split(inputs[split], voc, tmp / f"{split}.bin")
            if info["tokens"] == 0:
                raise UserError(f"the {split} split ({inputs[split].name}) is empty; give a non-empty text for it")
            splits[split] = info
            unk = f", {info['unknown_chars']} unknown characters ({info['unknown_distinct']} distinct)" if vocab == "chars" and split != "train" else ""
            say(f"  {split}: {info['chars']:,} characters, {info['bytes']:,} bytes, {info['tokens']:,} tokens{unk}")
        meta = {
            "source": source,
            "source_options": {k: str(v) for k, v in source_options.items() if v is not None},
            "vocab": {"kind": voc.kind, "size": voc.size, "dtype": np.dtype(voc.dtype).name},
            "splits": splits,
            "unknown_chars": {s: splits[s]["unknown_chars"] for s in SPLITS},
            "version": lstm_dist.__version__,
        }
        (tmp / "vocab.json").write_text(json.dumps(voc.to_dict(), ensure_ascii=False), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if (out / "meta.json").is_file():
            try:
                old = json.loads((out / "meta.json").read_text(encoding="utf-8"))
            except ValueError:
                old = {}
            if _same_corpus(old, meta) and all((out / f).is_file() for f in ("train.bin", "valid.bin", "test.bin", "vocab.json")) and not force:
                say(f"{out} already holds this corpus; left unchanged")
                return out
            if not force:
                raise UserError(f"{out} already holds a different corpus ({old.get('source')}, {old.get('vocab', {}).get('kind')} vocab); pass --force to replace it or choose another --out")
        if out.exists():
            old_dir = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old_dir)
            os.replace(tmp, out)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            try:
                os.replace(tmp, out)
            except OSError:  # another process finished the same directory first
                if not (out / "meta.json").is_file():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"done in {time.monotonic() - t0:.1f}s: {out}")
    return out


# ------------------------------------------------------------------------------------------ corpus


class Corpus:
    """A prepared corpus directory, checked on opening; splits are opened as read-only memmaps."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        p = self.path
        if not p.exists():
            raise UserError(f"corpus directory {p} does not exist; prepare it with: {_prepare_hint(p)}")
        if not p.is_dir():
            raise UserError(f"corpus path {p} is not a directory; point data.path at a directory made by: {_prepare_hint(p)}")
        meta_path = p / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"{p} is not a prepared corpus (no meta.json); prepare it with: {_prepare_hint(p)} --force")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise UserError(f"{meta_path} is not readable JSON ({exc}); re-prepare with: {_prepare_hint(p)} --force")
        source = self.meta.get("source")
        kind = self.meta.get("vocab", {}).get("kind")
        redo = _prepare_hint(p, source, kind) + " --force"
        if not (p / "vocab.json").is_file():
            raise UserError(f"{p / 'vocab.json'} is missing; re-prepare with: {redo}")
        self.vocab = load_vocab(p)
        if kind is not None and kind != self.vocab.kind:
            raise UserError(f"{p}: meta.json says a {kind} vocabulary but vocab.json holds {self.vocab.kind}; re-prepare with: {redo}")
        itemsize = np.dtype(self.vocab.dtype).itemsize
        self.sizes: dict[str, int] = {}
        for split in SPLITS:
            f = p / f"{split}.bin"
            if not f.is_file():
                raise UserError(f"{f} is missing; re-prepare with: {redo}")
            size = f.stat().st_size
            if size == 0:
                raise UserError(f"{f} is empty; re-prepare with: {redo}")
            if size % itemsize:
                raise UserError(f"{f} has {size} bytes, not a whole number of {np.dtype(self.vocab.dtype).name} tokens of the {self.vocab.kind} vocabulary; re-prepare with: {redo}")
            expected = self.meta.get("splits", {}).get(split, {}).get("tokens")
            if expected is not None and expected != size // itemsize:
                raise UserError(f"{f} holds {size // itemsize} {np.dtype(self.vocab.dtype).name} tokens but meta.json says {expected} ({self.vocab.kind} vocabulary); re-prepare with: {redo}")
            self.sizes[split] = size // itemsize

    def split(self, name: str) -> np.memmap:
        """The split's tokens as a read-only memmap (O(1): nothing is read until indexed)."""
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return np.memmap(self.path / f"{name}.bin", dtype=self.vocab.dtype, mode="r")

    def __repr__(self) -> str:
        return f"Corpus({str(self.path)!r}, {self.vocab!r}, sizes={self.sizes})"


# ------------------------------------------------------------------------------------------ streams


class Batch(NamedTuple):
    x: "torch.Tensor"  # int64 [batch, bptt]
    y: "torch.Tensor"  # int64 [batch, bptt], x shifted by one character
    epoch: int
    window: int
    reset: bool  # first window of an epoch: the trainer zeroes the hidden state


class EvalBatch(NamedTuple):
    x: "torch.Tensor"  # int64 [batch, bptt]
    y: "torch.Tensor"  # int64 [batch, bptt]
    mask: "torch.Tensor"  # bool [batch, bptt]: True where y is a real target to score
    reset: bool  # first window of the segments: start from a zero hidden state


def _gather(data: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """data[starts[i] + j] for j < width, in one fancy-indexing read of the memmap."""
    return np.asarray(data[np.add.outer(starts, np.arange(width, dtype=np.int64))])


class TokenStream:
    """Truncated-BPTT training windows of one rank over a split, with a resumable cursor.

    After the epoch's offset o (0 in epoch 0 or without `random_offset`; otherwise drawn in
    [0, bptt) from (seed, epoch), identical on every rank), the split is cut into world*batch
    streams of `stream_len` characters; stream s starts at o + s*stream_len, and rank r owns
    streams [r*batch, (r+1)*batch). Window k reads characters [k*bptt, k*bptt + bptt] of each
    stream. The stream length leaves room for the largest offset, so every epoch has the same
    `windows_per_epoch`.
    """

    def __init__(self, data: np.ndarray, rank: int, world: int, batch: int, bptt: int,
                 seed: int = 0, random_offset: bool = True) -> None:
        if world < 1 or batch < 1 or bptt < 1 or not 0 <= rank < world:
            raise ValueError(f"bad layout rank={rank} world={world} batch={batch} bptt={bptt}")
        self.data, self.rank, self.world, self.batch, self.bptt = data, rank, world, batch, bptt
        self.seed, self.random_offset = int(seed), bool(random_offset)
        self.n = int(len(data))
        streams = world * batch
        self._slack = bptt - 1 if random_offset else 0  # room kept for the largest epoch offset
        need = streams * (bptt + 1) + self._slack
        if self.n < need:
            raise UserError(
                f"the split has {self.n} characters but world_size*batch*(bptt+1){' + bptt-1' if self._slack else ''} = "
                f"{world}*{batch}*{bptt + 1}{f' + {self._slack}' if self._slack else ''} = {need} are needed; "
                "lower the batch size, bptt or the number of processes, or use a larger corpus"
            )
        self.stream_len = (self.n - self._slack) // streams
        self.windows_per_epoch = (self.stream_len - 1) // bptt
        self._cols = np.arange(rank * batch, (rank + 1) * batch, dtype=np.int64) * self.stream_len
        self.epoch, self.window, self.offset = 0, 0, 0

    def _offset_for(self, epoch: int) -> int:
        if epoch == 0 or not self.random_offset or self.bptt == 1:
            return 0
        return int(np.random.default_rng([self.seed, epoch]).integers(0, self.bptt))

    def next(self) -> Batch:
        if self.window >= self.windows_per_epoch:
            self.epoch += 1
            self.window = 0
            self.offset = self._offset_for(self.epoch)
        import torch

        starts = self.offset + self._cols + self.window * self.bptt
        chunk = torch.from_numpy(_gather(self.data, starts, self.bptt + 1)).long()
        b = Batch(chunk[:, :-1], chunk[:, 1:], self.epoch, self.window, self.window == 0)
        self.window += 1
        return b

    __next__ = next

    def __iter__(self) -> "TokenStream":
        return self

    def state_dict(self) -> dict:
        """The cursor and the layout it belongs to, as plain ints (bools for flags)."""
        return {"epoch": self.epoch, "window": self.window, "offset": self.offset,
                "world": self.world, "batch": self.batch, "bptt": self.bptt, "n": self.n}

    def load_state_dict(self, sd: dict) -> bool:
        """Continue from `sd`. Same layout (world*batch, bptt and split length): exact restore,
        returns False. Otherwise the position is re-cut: same epoch, the window that has consumed
        the same number of characters (rounded down), this layout's offset; returns True and the
        caller must start from zero hidden states."""
        epoch, window = int(sd["epoch"]), int(sd["window"])
        same = (int(sd["world"]) * int(sd["batch"]) == self.world * self.batch
                and int(sd["bptt"]) == self.bptt and int(sd["n"]) == self.n)
        if same:
            self.epoch, self.window, self.offset = epoch, window, int(sd["offset"])
            return False
        consumed = window * int(sd["world"]) * int(sd["batch"]) * int(sd["bptt"])
        self.epoch = epoch
        self.offset = self._offset_for(epoch)
        self.window = min(consumed // (self.world * self.batch * self.bptt), self.windows_per_epoch)
        return True


def eval_segments(n: int, streams: int) -> np.ndarray:
    """Boundaries b[0..streams] of the evaluation segments: segment s scores target positions
    [b[s], b[s+1]) of a split of n tokens. Targets are positions 1..n-1: the first token has no
    context to be predicted from, so it is never scored."""
    targets = max(n - 1, 0)
    return 1 + (np.arange(streams + 1, dtype=np.int64) * targets) // streams


def eval_batches(data: np.ndarray, rank: int, world: int, batch: int, bptt: int) -> Iterator[EvalBatch]:
    """Every predictable position of `data` exactly once across all ranks.

    Target positions 1..n-1 are cut into world*batch contiguous segments as equal as possible;
    rank r scores segments [r*batch, (r+1)*batch), window by window (bptt targets each, the
    hidden state carried between windows); x at a target p is token p-1. The last window is
    partial where a segment's length is not a multiple of bptt: `mask` marks the real targets
    (x and y are 0 elsewhere). Segments may be empty (n-1 < world*batch); ranks may yield
    different numbers of windows, so do not put collectives inside the loop.
    """
    if world < 1 or batch < 1 or bptt < 1 or not 0 <= rank < world:
        raise ValueError(f"bad layout rank={rank} world={world} batch={batch} bptt={bptt}")
    import torch

    n = int(len(data))
    bounds = eval_segments(n, world * batch)
    lo, hi = bounds[rank * batch:(rank + 1) * batch], bounds[rank * batch + 1:(rank + 1) * batch + 1]
    longest = int((hi - lo).max()) if n > 1 else 0
    cols = np.arange(bptt, dtype=np.int64)
    for k in range(-(-longest // bptt)):
        first = lo + k * bptt  # first target of this window, per segment
        valid = np.add.outer(first, cols) < hi[:, None]
        # read [first-1, first+bptt) clipped into the split, then blank what is not a real target
        idx = np.minimum(np.add.outer(first - 1, np.arange(bptt + 1, dtype=np.int64)), n - 1)
        chunk = np.asarray(data[idx]).astype(np.int64)
        x = np.where(valid, chunk[:, :-1], 0)  # separate arrays: x and y overlap inside chunk
        y = np.where(valid, chunk[:, 1:], 0)
        yield EvalBatch(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(valid), k == 0)


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
    p.add_argument("--vocab", default="bytes", choices=VOCABS, help="bytes (uint8, default) or chars (uint16)")
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
