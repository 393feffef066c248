"""Getting WikiText-103 raw: download (for real, from a local HTTP server with Range support),
resume, checksum refusal, a local --zip or --dir, and the built-in stdlib-docs source."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lstm_dist.common.errors import UserError  # noqa: E402
from lstm_dist.data.sources import _split_of, source_inputs, stdlib_documents, stdlib_docs_texts  # noqa: E402

TEXTS = {
    "train": "".join(f" = Heading {i} = \n The article number {i} says café and 日本.\n" for i in range(4000)),
    "valid": " = Valid = \n A valid paragraph.\n" * 50,
    "test": " = Test = \n A test paragraph with € in it.\n" * 60,
}
NAME = "wikitext-103-raw-v1.zip"


def make_zip(path: Path) -> bytes:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:  # stored: the download has some size
        for split, text in TEXTS.items():
            zf.writestr(f"wikitext-103-raw/wiki.{split}.raw", text.encode("utf-8"))
    return path.read_bytes()


def cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RANK", None)  # errors print on rank 0 only
    env.pop("LSTM_DIST_CACHE", None)
    return subprocess.run([sys.executable, "-m", "lstm_dist.data", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


def error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


class Server:
    """http.server on 127.0.0.1 serving one file, honouring `Range: bytes=N-`.

    `drops` = how many requests to cut off half-way (headers promise the whole body, then the
    connection closes); `corrupt` serves the file with one byte changed. `requests` records the
    Range header of each GET (None when there was none)."""

    def __init__(self, payload: bytes) -> None:
        self.payload, self.drops, self.corrupt, self.requests = payload, 0, False, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output quiet
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append(rng)
                body = outer.payload
                if outer.corrupt:
                    body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if rng:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                part = body[start:]
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if outer.drops > 0:
                    outer.drops -= 1
                    self.wfile.write(part[: len(part) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(part)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{NAME}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def archive(tmp_path):
    (tmp_path / "local").mkdir()
    path = tmp_path / "local" / NAME
    payload = make_zip(path)
    return path, payload, hashlib.sha256(payload).hexdigest()


@pytest.fixture
def server(archive):
    s = Server(archive[1])
    yield s
    s.close()


def check_corpus(out: Path) -> None:
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == "wikitext103"
    for split, text in TEXTS.items():
        raw = text.encode("utf-8")
        assert meta["splits"][split]["bytes"] == len(raw)
        assert meta["splits"][split]["chars"] == len(text)
        assert meta["splits"][split]["sha256"] == hashlib.sha256(raw).hexdigest()
        assert (out / f"{split}.bin").read_bytes() == raw


def test_download_good(tmp_path, server, archive):
    cache, out = tmp_path / "cache", tmp_path / "corpus"
    r = cli("prepare", "--source", "wikitext103", "--url", server.url, "--sha256", archive[2],
            "--cache-dir", cache, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "downloading wikitext-103-raw-v1.zip" in r.stderr and "100%" in r.stderr  # the progress bar
    assert sorted(p.name for p in cache.iterdir()) == [NAME]
    assert (cache / NAME).read_bytes() == archive[1]
    check_corpus(out)
    # a second prepare finds the verified archive in the cache and does not ask the server again
    seen = len(server.requests)
    r = cli("prepare", "--source", "wikitext103", "--url", server.url, "--sha256", archive[2],
            "--cache-dir", cache, "--out", tmp_path / "again", "--vocab", "chars")
    assert r.returncode == 0, r.stderr
    assert len(server.requests) == seen


def test_download_interrupted_then_resumed(tmp_path, server, archive):
    cache, out = tmp_path / "cache", tmp_path / "corpus"
    args = ("prepare", "--source", "wikitext103", "--url", server.url, "--sha256", archive[2],
            "--cache-dir", cache, "--out", out)
    server.drops = 1
    r = cli(*args, "--retries", "0")
    line = error_line(r)
    assert "interrupted" in line and "run the same command again" in line
    part = cache / (NAME + ".part")
    kept = part.stat().st_size
    assert 0 < kept < len(archive[1]) and not (cache / NAME).exists() and not out.exists()
    assert server.requests == [None]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert server.requests == [None, f"bytes={kept}-"]  # the second run resumed where the first stopped
    assert (cache / NAME).read_bytes() == archive[1] and not part.exists()
    check_corpus(out)


def test_download_retries_within_one_run(tmp_path, server, archive):
    server.drops = 1
    r = cli("prepare", "--source", "wikitext103", "--url", server.url, "--sha256", archive[2],
            "--cache-dir", tmp_path / "cache", "--out", tmp_path / "corpus")
    assert r.returncode == 0, r.stderr
    assert len(server.requests) == 2 and server.requests[0] is None and server.requests[1].startswith("bytes=")
    check_corpus(tmp_path / "corpus")


def test_download_corrupted_is_refused_and_removed(tmp_path, server, archive):
    cache, out = tmp_path / "cache", tmp_path / "corpus"
    server.corrupt = True
    r = cli("prepare", "--source", "wikitext103", "--url", server.url, "--sha256", archive[2],
            "--cache-dir", cache, "--out", out)
    line = error_line(r)
    actual = hashlib.sha256(archive[1][:100] + bytes([archive[1][100] ^ 0xFF]) + archive[1][101:]).hexdigest()
    assert str(cache / NAME) in line and archive[2] in line and actual in line
    assert list(cache.iterdir()) == []  # neither the archive nor a .part is kept
    assert not out.exists()


def test_default_hash_refuses_another_archive(tmp_path, server):
    # without --sha256 the real release's hash is expected: our small archive is refused
    r = cli("prepare", "--source", "wikitext103", "--url", server.url, "--cache-dir", tmp_path / "cache",
            "--out", tmp_path / "corpus")
    assert "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794" in error_line(r)
    assert list((tmp_path / "cache").iterdir()) == []


def test_local_zip_and_dir(tmp_path, archive):
    zpath, payload, digest = archive
    r = cli("prepare", "--source", "wikitext103", "--zip", zpath, "--sha256", digest, "--out", tmp_path / "c1")
    assert r.returncode == 0, r.stderr
    check_corpus(tmp_path / "c1")
    # a local copy is checked too, and never deleted
    r = cli("prepare", "--source", "wikitext103", "--zip", zpath, "--out", tmp_path / "c2")
    line = error_line(r)
    assert str(zpath) in line and digest in line and "--sha256" in line
    assert zpath.read_bytes() == payload
    r = cli("prepare", "--source", "wikitext103", "--zip", tmp_path / "missing.zip", "--out", tmp_path / "c2")
    assert "missing.zip" in error_line(r)
    d = tmp_path / "raw"
    d.mkdir()
    with zipfile.ZipFile(zpath) as zf:
        for split in TEXTS:
            (d / f"wiki.{split}.raw").write_bytes(zf.read(f"wikitext-103-raw/wiki.{split}.raw"))
    r = cli("prepare", "--source", "wikitext103", "--dir", d, "--out", tmp_path / "c3")
    assert r.returncode == 0, r.stderr
    check_corpus(tmp_path / "c3")
    (d / "wiki.test.raw").unlink()
    assert "wiki.test.raw" in error_line(cli("prepare", "--source", "wikitext103", "--dir", d, "--out", tmp_path / "c4"))


def test_zip_without_the_wikitext_layout(tmp_path):
    z = tmp_path / "other.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("readme.txt", "nothing here")
    digest = hashlib.sha256(z.read_bytes()).hexdigest()
    with pytest.raises(UserError, match="wiki.train.raw"):
        source_inputs("wikitext103", zip=z, sha256=digest)


def test_stdlib_docs_is_deterministic_prose(tmp_path):
    # (byte-identical output across runs and its size are checked through the CLI in test_data.py)
    docs = stdlib_documents()  # this interpreter's standard library, parsed once (seconds)
    names = [q for q, _ in docs]
    stdlib = Path(sysconfig.get_paths()["stdlib"])  # the default root: every document comes from a module there
    assert {q.split(".")[0] for q in names} <= {p.stem for p in stdlib.iterdir()}
    assert len(set(names)) > 1000
    assert "json.loads" in names and not any(".test." in q or q.startswith("test.") for q in names)
    split_sizes = {s: sum(_split_of(q) == s for q in names) / len(names) for s in ("train", "valid", "test")}
    assert 0.85 < split_sizes["train"] < 0.95 and 0.02 < split_sizes["valid"] < 0.08
    assert _split_of("json.loads") == _split_of("json.loads") in ("train", "valid", "test")
    # from a tree of our own: documents come from module, class and public function docstrings
    pkg = tmp_path / "lib" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Package doc."""\n')
    (pkg / "mod.py").write_text('"""Module doc."""\nclass C:\n    """Class doc."""\n    def m(self):\n        """Method doc."""\n'
                                'def _private():\n    """hidden"""\ndef f():\n    """Function doc."""\n')
    (tmp_path / "lib" / "broken.py").write_text("def (:\n")
    got = stdlib_documents(tmp_path / "lib")
    assert got == [("pkg", "Package doc."), ("pkg.mod", "Module doc."), ("pkg.mod.C", "Class doc."),
                   ("pkg.mod.C.m", "Method doc."), ("pkg.mod.f", "Function doc.")]
    assert np.isclose(sum(split_sizes.values()), 1.0)
    texts = stdlib_docs_texts(tmp_path / "lib")
    for qual, doc in got:  # each document sits whole in the split its name hashes to, and only there
        entry = f"{qual}\n\n{doc}\n\n".encode()
        assert [s for s, t in texts.items() if entry in t] == [_split_of(qual)]
