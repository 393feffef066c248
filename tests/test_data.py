"""Vocabularies, `prepare` through the real CLI, `Corpus` checks, and the stream layouts.

Stream tests use a split whose token at position p is p itself (an int64 array), so every x/y
value names the position it came from and coverage can be checked exactly.
"""

from __future__ import annotations

import ast
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lstm_dist.data.corpus import Corpus, Vocab, builtin_source_for, builtin_vocab_for, load_vocab  # noqa: E402
from lstm_dist.data.prepare import prepare  # noqa: E402
from lstm_dist.data.streams import Restore, TokenStream, eval_batches, eval_segments  # noqa: E402
from lstm_dist.common.errors import UserError  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real `python -m lstm_dist.data ARGS`, in a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RANK", None)  # errors print on rank 0 only
    return subprocess.run([sys.executable, "-m", "lstm_dist.data", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120)


@pytest.fixture
def cli_here(capsys, monkeypatch):
    """`python -m lstm_dist.data ARGS` in this process (its main() under run_cli, as `python -m` runs it),
    answered as `cli` answers: a CompletedProcess with the exit status and both streams."""
    from lstm_dist.common.errors import run_cli
    from lstm_dist.data.__main__ import main

    monkeypatch.delenv("RANK", raising=False)  # errors print on rank 0 only

    def run(*args) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, argv)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, exit_info.value.code, out, err)

    return run


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[-1], (n, lines[-1])


def positions(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


# ------------------------------------------------------------------------------------ vocabularies


def test_bytes_vocab_is_the_utf8_identity():
    v = Vocab("bytes")
    assert (v.kind, v.size, v.dtype) == ("bytes", 256, np.uint8)
    text = "naïve café — 日本 \U0001f600\n"
    ids = v.encode(text)
    assert ids.dtype == np.uint8 and ids.tobytes() == text.encode("utf-8")
    assert v.decode(ids) == text
    assert v.unknown(text) == []
    assert v.decode(np.array([0xE6, 0x97], dtype=np.uint8)) == "\ufffd"  # a cut character, replaced
    assert Vocab.from_dict(v.to_dict()) == v


@SETTINGS
@given(st.text(min_size=1, max_size=200), st.text(max_size=50))
def test_chars_vocab_round_trip_and_unknown(train, other):
    v = Vocab("chars", train)
    assert v.dtype == np.uint16 and v.size == len(set(train)) + 1
    ids = v.encode(train)
    assert ids.dtype == np.uint16 and len(ids) == len(train)
    assert int(ids.max()) < v.size - 1  # nothing in train maps to the unknown id
    assert v.decode(ids) == train
    missing = sorted(set(other) - set(train))
    assert v.unknown(other) == missing
    enc = v.encode(other)
    assert int((enc == v.unknown_id).sum()) == sum(c in missing for c in other)


def test_vocab_dict_is_plain_and_loads_with_weights_only(tmp_path):
    v = Vocab("chars", "hello wörld\n")
    d = v.to_dict()
    buf = io.BytesIO()
    torch.save({"vocab": d}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)["vocab"]
    assert Vocab.from_dict(back) == v
    assert Vocab.from_dict(back).decode(v.encode("wöööd")) == "wöööd"
    with pytest.raises(UserError, match="kind"):
        Vocab.from_dict({"kind": "words"})


def test_outside_text_is_read_one_way_whatever_the_chunks_with_the_exact_bad_byte(tmp_path):
    """`corpus.utf8_chunks`, the one reading of outside text (prepare's splits, `--text`, `--prompt-file`):
    strict UTF-8 with CR and a BOM kept as characters, the same text whatever the chunk size, and the
    offset of the first bad byte exact even when its sequence began in the chunk before (prepare said
    one byte too far when a character cut short straddled its 2 MB read)."""
    from lstm_dist.data.corpus import read_text_file, text_from_string, utf8_chunks
    from lstm_dist.data.prepare import CHUNK_BYTES

    good = "\ufeffnaïve\r\ncafé ☃ \U0001f600\r\n\r".encode("utf-8")
    bad = good + "☃".encode("utf-8")[:2] + b"x"  # a character cut short, then an ASCII byte
    for size in range(1, 9):
        pieces = list(utf8_chunks(io.BytesIO(good), "g", size))
        assert b"".join(r for r, _ in pieces) == good and "".join(t for _, t in pieces) == good.decode("utf-8")
        with pytest.raises(UserError, match=f"^b is not valid UTF-8 near byte {len(good)}; convert it to UTF-8 first$"):
            list(utf8_chunks(io.BytesIO(bad), "b", size))
    path = tmp_path / "windows.txt"
    path.write_bytes(good)
    assert read_text_file(path, "--text windows.txt") == good.decode("utf-8")  # not Path.read_text's "\n" for "\r\n"
    assert text_from_string("a\r\n\ufeff", "--prompt") == "a\r\n\ufeff"
    straddle = tmp_path / "straddle.txt"  # the cut character begins on the last byte of prepare's first read
    straddle.write_bytes(b"a" * (CHUNK_BYTES - 1) + "☃".encode("utf-8")[:2] + b"x")
    with pytest.raises(UserError, match=f"straddle.txt is not valid UTF-8 near byte {CHUNK_BYTES - 1};"):
        prepare("files", tmp_path / "c", quiet=True, train=straddle, valid=path, test=path)


def test_builtin_source_names():
    assert builtin_source_for("data/stdlib-docs") == "stdlib-docs"
    assert builtin_source_for("/x/stdlib-docs-chars") == "stdlib-docs"
    assert builtin_vocab_for("/x/stdlib-docs-chars") == "chars"
    assert builtin_vocab_for("data/stdlib-docs") == "bytes"
    assert builtin_source_for("data/wikitext103") == "wikitext103"
    assert builtin_source_for("data/mine") is None


# ----------------------------------------------------------------------------------------- prepare


def write_texts(d: Path, train: str, valid: str, test: str) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        paths[name] = d / f"{name}.txt"
        paths[name].write_bytes(text.encode("utf-8"))
    return paths


def test_prepare_files_cli_both_vocabs(tmp_path, cli_here):
    # > 2 MB (one read chunk), odd byte offset so a 2-byte 'é' straddles the chunk boundary
    train = "a" + "é" * 1_100_000 + "日本 text\n" * 1000 + "\U0001f600 with and never seen, a plain test line\n"
    valid = "é text with € and \U0001f680 never seen\n"
    test = "a plain test line\n"
    p = write_texts(tmp_path / "src", train, valid, test)
    for vocab in ("bytes", "chars"):
        out = tmp_path / f"c-{vocab}"
        r = cli_here("prepare", "--source", "files", "--train", p["train"], "--valid", p["valid"], "--test", p["test"],
                "--out", out, "--vocab", vocab)
        assert r.returncode == 0, r.stderr
        meta = json.loads((out / "meta.json").read_text())
        corpus = Corpus(out)
        assert corpus.vocab.kind == vocab and meta["vocab"]["kind"] == vocab
        for name, text in (("train", train), ("valid", valid), ("test", test)):
            s = meta["splits"][name]
            assert s["bytes"] == p[name].stat().st_size
            assert s["chars"] == len(text)
            assert s["tokens"] == len(corpus.split(name))
            assert s["sha256"] == __import__("hashlib").sha256(p[name].read_bytes()).hexdigest()
        assert meta["version"] == __import__("lstm_dist").__version__
        if vocab == "bytes":
            assert corpus.split("train").dtype == np.uint8
            assert corpus.split("train").tobytes() == p["train"].read_bytes()
            assert meta["unknown_chars"] == {"train": 0, "valid": 0, "test": 0}
        else:
            assert corpus.split("train").dtype == np.uint16
            assert corpus.vocab.decode(corpus.split("train")) == train
            # € and the rocket are not in train: 2 unknown characters in valid, reported twice
            assert meta["unknown_chars"] == {"train": 0, "valid": 2, "test": 0}
            assert "2 unknown characters" in r.stdout
            ids = corpus.split("valid")
            assert int((ids == corpus.vocab.unknown_id).sum()) == 2
        assert load_vocab(out) == corpus.vocab


def test_prepare_is_atomic_and_refuses_to_overwrite(tmp_path, cli_here):
    p = write_texts(tmp_path / "src", "train text " * 100, "valid", "test")
    out = tmp_path / "corpus"
    opts = dict(train=p["train"], valid=p["valid"], test=p["test"])
    prepare("files", out, quiet=True, **opts)
    before = (out / "train.bin").read_bytes()
    # the same corpus again: kept as it is
    assert prepare("files", out, quiet=True, **opts) == out
    # a different corpus: refused without force, nothing changed, no temporary directory left
    with pytest.raises(UserError, match="different corpus.*--force"):
        prepare("files", out, vocab="chars", quiet=True, **opts)
    assert (out / "train.bin").read_bytes() == before and Corpus(out).vocab.kind == "bytes"
    prepare("files", out, vocab="chars", force=True, quiet=True, **opts)
    assert Corpus(out).vocab.kind == "chars"
    # a failing prepare (invalid UTF-8 in test) leaves neither a corpus nor a temporary directory
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe broken")
    r = cli_here("prepare", "--source", "files", "--train", p["train"], "--valid", p["valid"], "--test", bad,
            "--out", tmp_path / "new")
    assert_one_line_error(r, "bad.txt", "UTF-8")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.txt", "corpus", "src"]


def test_prepare_cli_user_errors(tmp_path, cli_here):
    p = write_texts(tmp_path / "src", "train", "", "test")
    r = cli_here("prepare", "--source", "files", "--train", tmp_path / "nope.txt", "--valid", p["valid"], "--test", p["test"],
            "--out", tmp_path / "c")
    assert_one_line_error(r, "--train", "nope.txt", "does not exist")
    r = cli_here("prepare", "--source", "files", "--train", p["train"], "--valid", p["valid"], "--test", p["test"],
            "--out", tmp_path / "c")
    assert_one_line_error(r, "valid split", "empty")
    r = cli_here("prepare", "--source", "files", "--train", p["train"], "--out", tmp_path / "c")
    assert_one_line_error(r, "--valid", "--test")
    r = cli_here("prepare", "--source", "stdlib-docs", "--zip", "x.zip", "--out", tmp_path / "c")
    assert_one_line_error(r, "--zip", "stdlib-docs")
    assert not (tmp_path / "c").exists()


def test_prepare_stdlib_docs_cli(tmp_path):
    """Two real runs of `prepare --source stdlib-docs`, one per vocabulary, in processes of their own (so
    a salted hash would show): the same text, byte for byte, in every split; prose; 90/5/5 by document."""
    outs = {}
    for vocab in ("bytes", "chars"):
        out = tmp_path / f"sd-{vocab}"
        t = time.monotonic()
        r = cli("prepare", "--source", "stdlib-docs", "--out", out, "--vocab", vocab)
        took = time.monotonic() - t
        assert r.returncode == 0, r.stderr
        assert took < 30, took
        outs[vocab] = Corpus(out)
    meta = json.loads((tmp_path / "sd-bytes" / "meta.json").read_text())
    total = sum(s["bytes"] for s in meta["splits"].values())
    assert 500_000 < total < 5_000_000, total
    train = meta["splits"]["train"]["bytes"]
    assert 0.8 < train / total < 0.97  # ~90/5/5 by document
    b, c = outs["bytes"], outs["chars"]
    assert c.vocab.kind == "chars"
    for s in ("train", "valid", "test"):  # the chars corpus decodes to the bytes corpus's exact bytes
        assert c.vocab.decode(c.split(s)).encode("utf-8") == b.split(s).tobytes()
        assert c.meta["splits"][s]["sha256"] == b.meta["splits"][s]["sha256"]
    text = b.split("train").tobytes().decode("utf-8")
    assert "Return" in text and text.count("\n\n") > 1000  # prose, many documents


# ------------------------------------------------------------------------------------------ corpus


def test_corpus_errors(tmp_path):
    p = write_texts(tmp_path / "src", "some training text\n" * 50, "valid text", "test text")
    good = prepare("files", tmp_path / "c", vocab="chars", quiet=True, train=p["train"], valid=p["valid"], test=p["test"])

    def err(path) -> str:
        with pytest.raises(UserError) as e:
            Corpus(path)
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    assert "does not exist" in err(tmp_path / "stdlib-docs") and "--source stdlib-docs" in err(tmp_path / "stdlib-docs")
    (tmp_path / "empty").mkdir()
    assert "no meta.json" in err(tmp_path / "empty")
    # vocabulary missing
    c2 = tmp_path / "c2"
    os.system(f"cp -r {good} {c2}")
    (c2 / "vocab.json").unlink()
    assert "vocab.json is missing" in err(c2)
    # a split missing
    c3 = tmp_path / "c3"
    os.system(f"cp -r {good} {c3}")
    (c3 / "test.bin").unlink()
    m = err(c3)
    assert "test.bin is missing" in m and "prepare --source files" in m and "--force" in m
    # an empty split
    (c3 / "test.bin").write_bytes(b"")
    assert "test.bin is empty" in err(c3)
    # a uint16 split with an odd number of bytes
    (c3 / "test.bin").write_bytes(b"\x01\x00\x02")
    m = err(c3)
    assert "not a whole number of uint16" in m and "chars" in m
    # bytes written where uint16 tokens were expected (whole number, but not meta's count)
    (c3 / "test.bin").write_bytes(b"test text!")
    m = err(c3)
    assert "holds 5 uint16 tokens but meta.json says 9" in m
    with pytest.raises(UserError, match="unknown split"):
        Corpus(good).split("dev")


def test_split_is_a_readonly_memmap(tmp_path):
    p = write_texts(tmp_path / "src", "abcdef" * 1000, "v", "t")
    c = Corpus(prepare("files", tmp_path / "c", quiet=True, train=p["train"], valid=p["valid"], test=p["test"]))
    m = c.split("train")
    assert isinstance(m, np.memmap) and not m.flags.writeable and len(m) == 6000
    s = TokenStream(m, rank=0, world=1, batch=3, bptt=10)
    b = s.next()
    assert b.x.dtype == torch.int64 and b.x.shape == (3, 10)
    assert bytes(b.x[0].tolist()) == b"abcdefabcd"


# ------------------------------------------------------------------------------------ token stream


def layouts(max_world=4, max_batch=4, max_bptt=8):
    return st.tuples(st.integers(1, max_world), st.integers(1, max_batch), st.integers(1, max_bptt))


def need(world, batch, bptt, random_offset=True):
    return world * batch * (bptt + 1) + (bptt - 1 if random_offset else 0)


@SETTINGS
@given(layouts(), st.integers(0, 300), st.booleans(), st.integers(0, 2**31))
def test_training_windows_disjoint_cover_and_shift(layout, extra, random_offset, seed):
    world, batch, bptt = layout
    n = need(world, batch, bptt, random_offset) + extra
    data = positions(n)
    streams = [TokenStream(data, r, world, batch, bptt, seed=seed, random_offset=random_offset) for r in range(world)]
    W, L, B = streams[0].windows_per_epoch, streams[0].stream_len, world * batch
    assert W >= 1
    for epoch in range(3):
        xs, ys = [], []
        for r, s in enumerate(streams):
            for k in range(W):
                b = s.next()
                assert (b.epoch, b.window, b.reset) == (epoch, k, k == 0)
                assert b.x.shape == b.y.shape == (batch, bptt) and b.x.dtype == b.y.dtype == torch.int64
                assert torch.equal(b.y, b.x + 1)  # y is x shifted by one character
                assert torch.equal(b.x[:, 1:], b.y[:, :-1])
                xs.append(b.x.numpy().ravel())
                ys.append(b.y.numpy().ravel())
        xs, ys = np.concatenate(xs), np.concatenate(ys)
        assert len(np.unique(xs)) == len(xs)  # no input character read twice in an epoch
        assert len(np.unique(ys)) == len(ys)
        covered = np.union1d(xs, ys)
        assert len(covered) == B * (W * bptt + 1)
        remainder = n - len(covered)
        assert 0 <= remainder < B * bptt + B + bptt  # no stream could fit another window
        o = streams[0].offset
        assert all(s.offset == o for s in streams)  # the epoch's offset is the same on every rank
        assert 0 <= o < bptt and (o == 0 if epoch == 0 or not random_offset else True)
        assert covered.min() == o
        # each stream is one contiguous run of W*bptt+1 characters starting at o + s*L
        for sidx in range(B):
            lo = o + sidx * L
            assert np.array_equal(covered[sidx * (W * bptt + 1):(sidx + 1) * (W * bptt + 1)], np.arange(lo, lo + W * bptt + 1))


def test_random_offsets_vary_by_epoch_and_seed():
    data = positions(10_000)
    def offs(seed):
        s = TokenStream(data, 0, 1, 4, 64, seed=seed)
        out = []
        for _ in range(10):
            for _ in range(s.windows_per_epoch):
                s.next()
            out.append(s.offset)
        return out
    a, b = offs(1), offs(2)
    assert a == offs(1) and a != b and len(set(a)) > 1
    assert all(0 <= o < 64 for o in a + b)
    s = TokenStream(data, 0, 1, 4, 64, random_offset=False)
    for _ in range(3 * s.windows_per_epoch + 1):
        b = s.next()
    assert s.offset == 0 and b.epoch == 3


@SETTINGS
@given(layouts(), st.integers(0, 200), st.integers(0, 60), st.integers(1, 30), st.integers(0, 1000))
def test_restore_continues_bit_identically(layout, extra, advance, check, seed):
    world, batch, bptt = layout
    n = need(world, batch, bptt) + extra
    data = positions(n)
    for rank in {0, world - 1}:
        a = TokenStream(data, rank, world, batch, bptt, seed=seed)
        for _ in range(advance):  # often past one or more epoch boundaries (W can be 1)
            a.next()
        sd = a.state_dict()
        assert all(type(v) is int for v in sd.values()), sd
        assert json.loads(json.dumps(sd)) == sd
        b = TokenStream(data, rank, world, batch, bptt, seed=seed)
        assert b.load_state_dict(sd) is Restore.EXACT
        for _ in range(check):
            u, v = a.next(), b.next()
            assert torch.equal(u.x, v.x) and torch.equal(u.y, v.y)
            assert (u.epoch, u.window, u.reset) == (v.epoch, v.window, v.reset)


def test_restore_across_epoch_boundary_exactly():
    data = positions(5000)
    a = TokenStream(data, 1, 2, 3, 16, seed=7)
    W = a.windows_per_epoch
    for _ in range(W):  # at the very end of epoch 0
        a.next()
    b = TokenStream(data, 1, 2, 3, 16, seed=7)
    assert b.load_state_dict(a.state_dict()) is Restore.EXACT
    u, v = a.next(), b.next()
    assert u.epoch == v.epoch == 1 and u.reset and v.reset
    assert torch.equal(u.x, v.x) and a.offset == b.offset


@SETTINGS
@given(layouts(), layouts(), st.integers(0, 300), st.integers(0, 40))
def test_recut_to_another_layout_keeps_characters_consumed(l1, l2, extra, advance):
    (w1, b1, t1), (w2, b2, t2) = l1, l2
    n = max(need(w1, b1, t1), need(w2, b2, t2)) + extra
    data = positions(n)
    a = TokenStream(data, 0, w1, b1, t1, seed=3)
    for _ in range(advance):
        a.next()
    sd = a.state_dict()
    b = TokenStream(data, w2 - 1, w2, b2, t2, seed=3)
    recut = b.load_state_dict(sd) is Restore.RECUT
    assert recut is (w1 * b1 != w2 * b2 or t1 != t2)
    if not recut:
        return
    consumed = sd["window"] * w1 * b1 * t1
    per_window = w2 * b2 * t2
    assert b.epoch == sd["epoch"]
    if b.window < b.windows_per_epoch:
        assert b.window * per_window <= consumed < (b.window + 1) * per_window
    else:  # more than this layout's epoch holds: the next batch starts the next epoch
        assert consumed >= b.windows_per_epoch * per_window
    nxt = b.next()
    assert torch.equal(nxt.y, nxt.x + 1)
    assert nxt.epoch in (sd["epoch"], sd["epoch"] + 1)


def test_too_short_split_is_a_user_error():
    with pytest.raises(UserError) as e:
        TokenStream(positions(100), 0, 2, 4, 16)
    msg = str(e.value)
    assert "has 100 characters" in msg and "151 are needed" in msg and "lower" in msg and "\n" not in msg
    TokenStream(positions(151), 0, 2, 4, 16)  # exactly enough
    TokenStream(positions(136), 0, 2, 4, 16, random_offset=False)


# ------------------------------------------------------------------------------------- evaluation


@SETTINGS
@given(layouts(max_world=5, max_batch=5, max_bptt=9), st.integers(0, 250), st.integers(0, 30), st.integers(0, 3))
def test_eval_scores_every_target_once_each_segment_after_its_context(layout, n, context, max_windows):
    """Each segment reads the `context` positions before it (unscored) then its own, in order, so its
    state can be carried; together the segments score positions 1..n-1 exactly once (with `max_windows`,
    the first max_windows*bptt of each)."""
    world, batch, bptt = layout
    base = 1000
    data = positions(n) + base  # values never 0, so zeroed padding is recognisable
    bounds = eval_segments(n, world * batch)
    targets = []
    for rank in range(world):
        read = [[] for _ in range(batch)]  # positions each segment reads, in order
        scored = [[] for _ in range(batch)]
        for k, e in enumerate(eval_batches(data, rank, world, batch, bptt, context=context, max_windows=max_windows)):
            assert e.reset == (k == 0)
            assert e.x.shape == e.y.shape == e.mask.shape == (batch, bptt)
            assert e.x.dtype == torch.int64 and e.mask.dtype == torch.bool
            inside = e.y != 0
            assert torch.equal(e.x[inside], e.y[inside] - 1)  # x at position p is token p-1, context included
            assert not e.x[~inside].any() and not bool((e.mask & ~inside).any())
            # in each row: what is read is a prefix of the window (padding only after the segment's end)
            assert torch.equal(inside, torch.cummin(inside.int(), dim=1).values.bool())
            for i in range(batch):
                read[i].extend((e.y[i][inside[i]] - base).tolist())
                scored[i].extend((e.y[i][e.mask[i]] - base).tolist())
        for i in range(batch):
            lo, hi = int(bounds[rank * batch + i]), int(bounds[rank * batch + i + 1])
            want = list(range(lo, min(hi, lo + max_windows * bptt) if max_windows else hi))
            assert scored[i] == want
            # the context: the positions just before the segment, as many as there are (none for an empty one)
            first = max(1, lo - context) if want else lo
            assert read[i] == list(range(first, lo)) + want
            targets.extend(scored[i])
    if not max_windows:
        assert sorted(targets) == list(range(1, n))
    with pytest.raises(ValueError):
        next(eval_batches(data, 0, world, batch, bptt, context=-1))


def test_eval_on_a_memmap_with_partial_last_window(tmp_path):
    p = write_texts(tmp_path / "src", "0123456789" * 10, "x", "y")
    c = Corpus(prepare("files", tmp_path / "c", quiet=True, train=p["train"], valid=p["valid"], test=p["test"]))
    batches = list(eval_batches(c.split("train"), 0, 1, 2, 32))
    # 99 targets in 2 segments (49 and 50): two windows, the second partial
    assert len(batches) == 2 and int(sum(b.mask.sum() for b in batches)) == 99
    assert bytes(batches[0].x[0, :5].tolist()) == b"01234" and bytes(batches[0].y[0, :5].tolist()) == b"12345"


def test_the_training_path_imports_nothing_of_preparation():
    """Reading (corpus, streams) is apart from preparing (prepare, sources): the trainer loads only the former."""
    code = ("import sys, lstm_dist.train, lstm_dist.evaluate, lstm_dist.generate; "
            "print(sorted(m for m in sys.modules if m.startswith('lstm_dist.data')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert proc.returncode == 0, proc.stderr
    loaded = ast.literal_eval(proc.stdout)
    assert "lstm_dist.data.corpus" in loaded and "lstm_dist.data.streams" in loaded, loaded
    assert not {"lstm_dist.data.prepare", "lstm_dist.data.sources", "lstm_dist.data.__main__"} & set(loaded), loaded
