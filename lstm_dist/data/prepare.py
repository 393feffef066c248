"""Preparing a corpus directory from a source's text: ``prepare(source, out, vocab=...)``.

Where the text comes from (WikiText-103, the built-in stdlib-docs corpus, files) is
`lstm_dist.data.sources`; what a corpus directory holds, and reading it, is `lstm_dist.data.corpus`. This
module streams each split in chunks, encodes it with the vocabulary, and writes the directory
atomically. The command line is `python -m lstm_dist.data prepare`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from lstm_dist import __version__
from lstm_dist.data.corpus import SPLITS, VOCABS, Vocab, code_points, utf8_chunks
from lstm_dist.common.errors import UserError
from lstm_dist.config import DataConfig
from lstm_dist.data.sources import SplitInput, source_inputs

# Read/encode granularity: bounds peak memory whatever the file size. Kept small (well under glibc's
# 32 MB mmap ceiling) so the per-chunk temporaries are reused from the heap instead of fragmenting it.
CHUNK_BYTES = 2 << 20

def _decoded_chunks(inp: SplitInput) -> Iterator[tuple[bytes, str]]:
    """(raw chunk, its text) in order, read the one way all outside text is read
    (`lstm_dist.data.corpus.utf8_chunks`: strict UTF-8, CR and a BOM kept as characters); invalid UTF-8
    becomes a UserError naming the input and the byte offset."""
    stream: BinaryIO = inp.open()
    try:
        yield from utf8_chunks(stream, inp.name, CHUNK_BYTES)
    finally:
        stream.close()


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
            seen[code_points(text)] = True
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
                cps = code_points(text)
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


def prepare(source: str, out: str | os.PathLike, vocab: str = DataConfig.vocab, force: bool = False,
            quiet: bool = False, **source_options) -> Path:
    """Prepare `source` into the corpus directory `out` and return its path.

    Writes train.bin/valid.bin/test.bin, vocab.json and meta.json into a temporary directory next
    to `out` and renames it into place, so a failed run leaves no half corpus. If `out` already
    holds the same corpus (same input hashes and vocabulary) it is kept as is; a different one is
    replaced only with `force=True`. `source_options` go to `lstm_dist.data.sources.source_inputs`.
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
            "version": __version__,
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
