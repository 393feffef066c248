"""Reading a prepared corpus directory: its vocabulary and its splits as read-only memmaps.

A corpus directory (made by `lstm_dist.data.prepare`) holds train.bin, valid.bin, test.bin (the token
ids of each split, raw), vocab.json and meta.json. Vocabularies:

- ``bytes`` (default): the 256 byte values of the UTF-8 text. A prepared split is the text's bytes
  as uint8, so every text can be encoded and nothing is ever unknown.
- ``chars``: the Unicode characters that occur in the training split, sorted by code point, ids
  0..n-1 as uint16, plus one reserved id n for any character the training split never had
  (counted and reported when valid/test are prepared).

A score is named after its vocabulary's token, the same way everywhere it appears (console, `evaluate
--json`, metrics.jsonl, W&B; `Vocab.units`, docs/scoring.md): ``bytes`` scores are bits per byte (``bpb``,
counted in ``bytes``), ``chars`` scores bits per character (``bpc``, counted in ``chars``).

Opening a `Corpus` checks the directory and reads nothing of the splits: `split(name)` is an O(1)
memmap. Nothing here prepares a corpus; the training path imports only this and `streams`.

Text from outside a corpus is read here too, in the one way a corpus split is read, whichever entry
reads it (`prepare`'s splits, `evaluate --text`, `generate --prompt`/`--prompt-file`, training's sample
prompt), so one file gives the same characters, and the same ids, everywhere:

- a file is its bytes decoded as strict UTF-8 (`utf8_chunks`): nothing is translated, so a CR
  (``\r``, as in CRLF line ends) stays a character of its own, and a byte-order mark at the start
  (EF BB BF) stays the character U+FEFF; bytes that are not UTF-8 are refused, in one line naming
  the byte offset;
- a string (a command-line `--prompt`, a constant) is taken as given, after checking that it is
  Unicode text at all (`text_from_string`: an undecodable command-line byte is refused).

Characters a chars vocabulary lacks are said in one line naming where they came from (`lacking_note`).
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple, Sequence

import numpy as np

from lstm_dist.common.errors import UserError
from lstm_dist.config import DataConfig, choices

VOCABS = choices("data.vocab")  # the vocabulary kinds, as the config declares data.vocab's values
SPLITS = ("train", "valid", "test")

# Where each built-in source lives by default, relative to the working directory. A directory
# whose last component is one of these names (or that name + "-chars", meaning the chars
# vocabulary) is recognised by `builtin_source_for`, so a trainer pointed at a missing default
# directory can prepare it itself. wikitext103 can only be prepared that way when its archive can
# be downloaded (or is already in the cache).
# The stdlib-docs directory is the config's default data.path (written there, read here).
DEFAULT_DIRS = {"stdlib-docs": DataConfig.path, "wikitext103": "data/wikitext103"}
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


class Units(NamedTuple):
    """The names of a vocabulary's token in scores: `token` in prose ("bits per byte"), `count` the key
    of a number of tokens ("valid_bytes", evaluate's "bytes"), `score` the key of bits per token
    ("valid_bpb", the training line's "bpb")."""

    token: str
    count: str
    score: str

    @property
    def per(self) -> str:
        """'bits per byte' or 'bits per character'."""
        return f"bits per {self.token}"


# One name per vocabulary: a bits-per-byte figure and a bits-per-character one measure different things
# (a UTF-8 character is 1-4 bytes), so they never share a key.
UNITS = {"bytes": Units("byte", "bytes", "bpb"), "chars": Units("character", "chars", "bpc")}


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

    @property
    def units(self) -> Units:
        """How scores over this vocabulary's tokens are named (`UNITS`)."""
        return UNITS[self.kind]

    def encode(self, text: str) -> np.ndarray:
        if self.kind == "bytes":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()
        return self.lut[code_points(text)]

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


def code_points(text: str) -> np.ndarray:
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
        size = self.meta.get("vocab", {}).get("size")
        if size is not None and size != self.vocab.size:  # e.g. a vocab.json copied from another corpus: ids would not fit
            raise UserError(f"{p}: vocab.json has {self.vocab.size} ids but the splits were encoded with {size} (meta.json); "
                            f"it belongs to another corpus; re-prepare with: {redo}")
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


# ----------------------------------------------------------------------------- text from outside

# Read granularity of outside text: bounds peak memory whatever the file size.
TEXT_CHUNK_BYTES = 2 << 20


def utf8_chunks(stream: BinaryIO, name: str, chunk_bytes: int = TEXT_CHUNK_BYTES) -> Iterator[tuple[bytes, str]]:
    """The one reading of outside text: (raw chunk, its text) of a binary stream, in order, ending with
    (b"", the text held back at the end).

    Strict UTF-8 of the bytes as they are: no newline translation (a CR stays the character ``\r``),
    and a byte-order mark stays the character U+FEFF. A character split across chunks is held back
    until the next one, so the texts joined are the whole decoding whatever `chunk_bytes` is. Bytes
    that are not UTF-8 raise `UserError` "`name` is not valid UTF-8 near byte N; ...", N the offset
    in the stream of the first byte of the invalid sequence. An `OSError` while reading is a
    `UserError` naming `name` too. The stream is read, not closed.
    """
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0  # bytes of the stream before `raw`
    while True:
        try:
            raw = stream.read(chunk_bytes)
        except OSError as exc:
            raise UserError(f"{name} cannot be read near byte {offset} ({exc.strerror or exc}); check the file and the disk") from None
        pending = len(dec.getstate()[0])  # bytes of an unfinished character held back from before `raw`
        try:
            text = dec.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:  # exc.start counts from the held-back bytes
            raise UserError(f"{name} is not valid UTF-8 near byte {offset - pending + exc.start}; "
                            "convert it to UTF-8 first") from None
        yield raw, text
        if not raw:
            return
        offset += len(raw)


def open_text_file(path: str | os.PathLike, name: str, directory_hint: str = "pass a text file") -> BinaryIO:
    """`path` opened for `utf8_chunks` (binary), or a one-line `UserError` saying what is wrong with it;
    `name` says where the path came from (e.g. ``--text notes.txt``)."""
    try:
        return open(Path(path), "rb")
    except FileNotFoundError:
        raise UserError(f"{name} does not exist; pass an existing UTF-8 text file") from None
    except IsADirectoryError:
        raise UserError(f"{name} is a directory; {directory_hint}") from None
    except OSError as exc:
        raise UserError(f"{name} cannot be read ({exc.strerror or exc}); fix the path or its permissions") from None


def read_text_file(path: str | os.PathLike, name: str, directory_hint: str = "pass a text file") -> str:
    """The whole text of a file, read as a corpus split is read (`utf8_chunks`: strict UTF-8, CR and a
    BOM kept as characters). Errors: one-line `UserError`s naming `name` (missing, a directory,
    unreadable, not UTF-8 with the byte offset)."""
    with open_text_file(path, name, directory_hint) as stream:
        return "".join(text for _, text in utf8_chunks(stream, name))


def check_utf8_file(path: str | os.PathLike, name: str, directory_hint: str = "pass a text file") -> int:
    """Check, streaming in chunks, that a file reads as `read_text_file` reads it; returns its size in
    bytes. For callers that use the bytes themselves (a memory-mapped bytes-vocabulary text), so that
    a file they accept is one every other entry accepts too. Errors as `read_text_file`."""
    size = 0
    with open_text_file(path, name, directory_hint) as stream:
        for raw, _ in utf8_chunks(stream, name):
            size += len(raw)
    return size


def text_from_string(text: str, name: str) -> str:
    """A string from outside (a command-line option, a constant), taken as given: no newline or BOM
    handling, so it is the same characters as a file holding its UTF-8 bytes. Refused with one line
    when it is not Unicode text: Python gives a command-line byte that is not UTF-8 as a lone
    surrogate (U+DC80..U+DCFF), which no vocabulary can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        cp = ord(text[exc.start])
        what = (f"the byte 0x{cp - 0xDC00:02x}, which is not UTF-8" if 0xDC80 <= cp <= 0xDCFF
                else f"the lone surrogate U+{cp:04X}")
        raise UserError(f"{name} is not valid UTF-8 text: character {exc.start} is {what}; "
                        "pass UTF-8 text (set a UTF-8 locale, or put the text in a UTF-8 file)") from None
    return text


# What the characters kept verbatim are, for a line about characters a vocabulary lacks.
_VERBATIM = {"\r": "'\\r' is the CR of CRLF line ends", "\ufeff": "'\\ufeff' is a byte-order mark"}


def lacking_note(source: str, chars: Sequence[str], then: str, count: int | None = None,
                 vocab_name: str = "the checkpoint's chars vocabulary") -> str:
    """One line (no `error:`/`warning:` prefix) about characters a chars vocabulary lacks:
    "`source` has N character(s) `vocab_name` lacks: 'x', 'y'; `then`", where `source` says where
    the text came from (``--text notes.txt``, ``the prompt``, ``the training sample prompt 'The '``)
    and `then` what happens to them or the fix. `chars`: the distinct characters (sorted; may be
    empty when only a count is known); `count`: their occurrences when it differs from the distinct
    count. A CR or a BOM among them gets a note that text is read verbatim, and how to avoid them."""
    n = len(chars) if count is None else count
    distinct = f" ({len(chars)} distinct)" if chars and count is not None and count != len(chars) else ""
    shown = (": " + ", ".join(repr(c) for c in chars[:20]) + (", ..." if len(chars) > 20 else "")) if chars else ""
    why = [_VERBATIM[c] for c in ("\r", "\ufeff") if c in chars]
    hint = (f" ({' and '.join(why)}, kept as characters: text is read verbatim, as a corpus split is; "
            "save it with LF line ends and no BOM to drop them)") if why else ""
    return f"{source} has {n:,} character(s){distinct} {vocab_name} lacks{shown}; {then}{hint}"
