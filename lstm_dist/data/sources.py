"""Where the text comes from: WikiText-103 raw (download or local copy), the built-in offline corpus,
or any three UTF-8 files.

Every source answers the same question, "how do I read the train/valid/test text as bytes?", with a
`SplitInput` per split: a name for messages and `meta.json`, and a function that opens a binary
stream. Nothing here encodes or stores tokens; that is `lstm_dist.data.prepare`'s job, which reads
these streams in chunks so a 540 MB split never sits in memory.

Sources:

- ``wikitext103``: the ``wikitext-103-raw-v1.zip`` archive, from ``--zip`` (a local copy), ``--dir``
  (a directory already holding ``wiki.{train,valid,test}.raw``) or downloaded into a cache directory
  (``--cache-dir``, default ``$LSTM_DIST_CACHE`` or ``~/.cache/lstm_dist``). A download goes to a
  ``.part`` file, resumes with an HTTP Range request when interrupted, and is sha256-checked before
  anything is unpacked; a file with the wrong hash is deleted, never kept half-way.
- ``stdlib-docs``: docstrings of the Python standard library installed with this interpreter, read
  with `ast` (nothing is imported), about 1.7 MB of English prose on Python 3.11, built in seconds
  and split by a stable hash of each document's qualified name (about 90/5/5). The same Python gives
  the same bytes on every run.
- ``files``: ``--train FILE --valid FILE --test FILE``, any UTF-8 text, read verbatim as every text
  from outside is (`lstm_dist.data.corpus.utf8_chunks`): a CR and a leading byte-order mark are characters.
"""

from __future__ import annotations

import ast
import hashlib
import http.client
import io
import os
import sys
import sysconfig
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from lstm_dist.data.corpus import SPLITS
from lstm_dist.common.errors import UserError

SOURCES = ("wikitext103", "stdlib-docs", "files")

WIKITEXT103_URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip"
WIKITEXT103_SHA256 = "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794"
WIKITEXT103_BYTES = 191_984_949
# The archive's members, by split; matched by file name so a re-zipped copy with another top
# directory also works.
WIKITEXT103_FILES = {"train": "wiki.train.raw", "valid": "wiki.valid.raw", "test": "wiki.test.raw"}

_CHUNK = 1 << 20


@dataclass(frozen=True)
class SplitInput:
    """One split's text: `name` says where it comes from (for messages and meta.json); `open()`
    returns a fresh binary stream of its UTF-8 bytes, read by the caller in chunks."""

    name: str
    open: Callable[[], BinaryIO]


def default_cache_dir() -> Path:
    """`$LSTM_DIST_CACHE` if set, else `~/.cache/lstm_dist`."""
    env = os.environ.get("LSTM_DIST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lstm_dist"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------- download


class _Progress:
    """A plain-text progress line on stderr: redrawn in place on a terminal, one line per ~10%
    otherwise (so logs of batch jobs stay short)."""

    def __init__(self, label: str, total: int | None, start: int) -> None:
        self.label, self.total, self.start = label, total, start
        self.t0 = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.next_pct = 10

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        pct = 100.0 * done / self.total if self.total else None
        if self.tty:
            if not final and now - self.last < 0.25:
                return
        elif not final and (pct is None or pct < self.next_pct):
            return
        if pct is not None:
            while self.next_pct <= pct:
                self.next_pct += 10
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-6) / 1e6
        size = f"{done / 1e6:.1f} MB" + (f" / {self.total / 1e6:.1f} MB ({pct:3.0f}%)" if self.total else "")
        line = f"downloading {self.label}: {size}, {rate:.1f} MB/s"
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def _fetch_once(url: str, part: Path, timeout: float) -> None:
    """Append the rest of `url` to `part`, asking for a byte range when `part` already has bytes."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "lstm_dist"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the .part file is already whole
            return
        raise
    with resp:
        total = None
        if resp.status == 206:
            rng = resp.headers.get("Content-Range", "")  # "bytes START-END/TOTAL"
            if not rng.startswith(f"bytes {have}-"):
                raise OSError(f"server answered a range request with {rng!r}")
            tail = rng.rsplit("/", 1)[-1]
            total = int(tail) if tail.isdigit() else None
            mode = "ab"
        else:  # 200: the server ignored the range (or none was asked); start over
            have = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        name = Path(urllib.parse.urlparse(url).path).name or url
        bar = _Progress(name, total, have)
        done = have
        with open(part, mode) as out:
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                done += len(chunk)
                bar.update(done)
        bar.update(done, final=True)
        if total is not None and done < total:
            raise OSError(f"connection closed after {done} of {total} bytes")


def download(
    url: str,
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
) -> Path:
    """Download `url` into `cache_dir` (default `default_cache_dir()`) and return the file's path.

    The bytes go to `<name>.part` first; an interrupted transfer is resumed with an HTTP Range
    request, up to `retries` more times in this call and again on the next call. When `sha256` is
    given the finished file is checked before it gets its final name; a mismatch deletes it and
    raises `UserError` naming the file, the expected and the actual hash. A file already in the
    cache with the right hash is reused without touching the network.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise UserError(f"cannot tell a file name from the URL {url!r}; give a URL ending in the archive's name")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the cache directory {cache} ({exc.strerror}); pass --cache-dir or set LSTM_DIST_CACHE")
    if not os.access(cache, os.W_OK | os.X_OK):
        raise UserError(f"the cache directory {cache} is not writable; pass --cache-dir or set LSTM_DIST_CACHE to a writable directory")
    final, part = cache / name, cache / (name + ".part")
    if final.exists():
        if sha256 is None or sha256_file(final) == sha256.lower():
            return final
        print(f"{final} does not have the expected sha256; downloading it again", file=sys.stderr)
        final.unlink()
    attempt = 0
    while True:
        try:
            _fetch_once(url, part, timeout)
            break
        except (OSError, http.client.HTTPException) as exc:  # HTTP errors, IncompleteRead, resets, timeouts
            if isinstance(exc, urllib.error.HTTPError) and exc.code < 500:
                part.unlink(missing_ok=True)
                raise UserError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}; check --url")
            if attempt >= retries:
                have = part.stat().st_size if part.exists() else 0
                reason = getattr(exc, "reason", None) or exc
                if have == 0 and isinstance(exc, urllib.error.URLError):  # never connected: nothing to resume
                    part.unlink(missing_ok=True)
                    raise UserError(f"cannot download {url} ({reason}); check --url and the network, "
                                    "or pass --zip with a local copy of the archive")
                raise UserError(
                    f"downloading {url} was interrupted ({reason}) with {have} bytes kept in {part}; "
                    "run the same command again to resume"
                )
            attempt += 1
            print(f"download interrupted ({exc}); resuming (attempt {attempt + 1})", file=sys.stderr)
            time.sleep(min(2.0 ** attempt, 10.0) * 0.5)
    if sha256 is not None:
        actual = sha256_file(part)
        if actual != sha256.lower():
            part.unlink()
            raise UserError(
                f"downloaded file {final} has sha256 {actual} but {sha256.lower()} was expected; "
                "it was deleted; check --url and --sha256, then run again"
            )
    os.replace(part, final)
    return final


# ------------------------------------------------------------------------------------ wikitext-103


def _check_local_archive(path: Path, sha256: str | None) -> None:
    if not path.is_file():
        raise UserError(f"--zip {path} does not exist or is not a file; give the path of wikitext-103-raw-v1.zip")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256.lower():
            raise UserError(
                f"{path} has sha256 {actual} but {sha256.lower()} was expected; "
                "use an intact wikitext-103-raw-v1.zip, or pass --sha256 with the hash you trust"
            )


def _zip_inputs(path: Path) -> dict[str, SplitInput]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        raise UserError(f"{path} is not a zip archive; give the path of wikitext-103-raw-v1.zip")
    found = {}
    for split, fname in WIKITEXT103_FILES.items():
        members = sorted(n for n in names if n.rsplit("/", 1)[-1] == fname)
        if not members:
            raise UserError(f"{path} holds no {fname}; is it wikitext-103-raw-v1.zip (wikitext-103-raw/{fname})?")
        found[split] = members[0]

    def opener(member: str) -> Callable[[], BinaryIO]:
        def open_member() -> BinaryIO:
            zf = zipfile.ZipFile(path)
            stream = zf.open(member)
            close = stream.close

            def close_both() -> None:  # closing the member also closes the archive it came from
                close()
                zf.close()

            stream.close = close_both  # type: ignore[method-assign]
            return stream

        return open_member

    return {s: SplitInput(f"{path.name}:{m}", opener(m)) for s, m in found.items()}


def _file_inputs(paths: dict[str, Path], flag: str) -> dict[str, SplitInput]:
    out = {}
    for split, p in paths.items():
        if not p.is_file():
            raise UserError(f"{flag.format(split=split)} file {p} does not exist or is not a file; check the path")
        out[split] = SplitInput(str(p), (lambda p=p: open(p, "rb")))
    return out


def wikitext103_inputs(
    zip: str | os.PathLike | None = None,
    dir: str | os.PathLike | None = None,
    url: str | None = None,
    sha256: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    retries: int = 3,
) -> dict[str, SplitInput]:
    """The three splits of WikiText-103 raw, from `dir`, from the local archive `zip`, or from the
    archive downloaded from `url` (default the canonical address) into `cache_dir`. `sha256`
    overrides the expected hash of the archive (checked for `zip` too)."""
    if zip is not None and dir is not None:
        raise UserError("give either --zip or --dir for wikitext103, not both")
    if dir is not None:
        d = Path(dir).expanduser()
        if not d.is_dir():
            raise UserError(f"--dir {d} is not a directory; give the directory holding wiki.train.raw, wiki.valid.raw, wiki.test.raw")
        return _file_inputs({s: d / f for s, f in WIKITEXT103_FILES.items()}, "--dir {split}")
    expected = (sha256 or WIKITEXT103_SHA256).lower()
    if zip is not None:
        path = Path(zip).expanduser()
        _check_local_archive(path, expected)
    else:
        path = download(url or WIKITEXT103_URL, cache_dir, expected, retries=retries)
    return _zip_inputs(path)


# ------------------------------------------------------------------------------------ stdlib-docs

# Directories of the standard library that hold tests, examples or vendored code rather than
# documented API.
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                     "lib2to3", "ensurepip", "turtledemo", "config-3"}


def _public(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def stdlib_documents(root: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(qualified name, docstring) for the modules, public classes and public functions/methods of
    the standard library under `root` (default: this interpreter's), in a fixed order. Files are
    parsed with `ast`; nothing is imported or executed."""
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    docs: list[tuple[str, str]] = []

    def visit(node: ast.AST, qual: str) -> None:
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc:
            docs.append((qual, doc))
        for child in getattr(node, "body", []):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _public(child.name):
                visit(child, f"{qual}.{child.name}")

    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith((".", "config-")))
        for fname in sorted(filenames):
            if not fname.endswith(".py") or not (_public(fname[:-3]) or fname == "__init__.py"):
                continue
            path = Path(dirpath) / fname
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError, OSError):
                continue  # a file this Python cannot parse has no docs for us
            rel = path.relative_to(base).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            if parts:
                visit(tree, ".".join(parts))
    return docs


def _split_of(qualname: str) -> str:
    """Train/valid/test by a stable hash of the name (not Python's salted `hash`): 90/5/5."""
    bucket = int.from_bytes(hashlib.sha256(qualname.encode("utf-8")).digest()[:8], "big") % 100
    return "train" if bucket < 90 else "valid" if bucket < 95 else "test"


def stdlib_docs_texts(root: str | os.PathLike | None = None) -> dict[str, bytes]:
    """The built-in corpus as UTF-8 bytes per split. Each document is its qualified name on a line,
    a blank line, the docstring, and a blank line."""
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for qual, doc in stdlib_documents(root):
        parts[_split_of(qual)].append(f"{qual}\n\n{doc}\n\n")
    # 'replace' keeps a stray surrogate written as an escape in some docstring from failing the build
    return {s: "".join(p).encode("utf-8", errors="replace") for s, p in parts.items()}


def stdlib_docs_inputs() -> dict[str, SplitInput]:
    texts = stdlib_docs_texts()
    ver = "%d.%d.%d" % sys.version_info[:3]
    return {s: SplitInput(f"stdlib-docs:{s} (Python {ver})", (lambda b=b: io.BytesIO(b))) for s, b in texts.items()}


# -------------------------------------------------------------------------------------- dispatch


def source_inputs(source: str, **options) -> dict[str, SplitInput]:
    """The `SplitInput` of each split for a named source. Options (None means not given):
    wikitext103: zip, dir, url, sha256, cache_dir, retries; files: train, valid, test; stdlib-docs: none."""
    given = {k: v for k, v in options.items() if v is not None}
    allowed = {
        "wikitext103": {"zip", "dir", "url", "sha256", "cache_dir", "retries"},
        "stdlib-docs": set(),
        "files": {"train", "valid", "test"},
    }
    if source not in allowed:
        raise UserError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    extra = sorted(set(given) - allowed[source])
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise UserError(f"{flags} does not apply to --source {source}; drop it")
    if source == "wikitext103":
        return wikitext103_inputs(**given)
    if source == "stdlib-docs":
        return stdlib_docs_inputs()
    missing = [s for s in SPLITS if s not in given]
    if missing:
        raise UserError(f"--source files needs --train, --valid and --test; missing {', '.join('--' + m for m in missing)}")
    return _file_inputs({s: Path(given[s]).expanduser() for s in SPLITS}, "--{split}")
